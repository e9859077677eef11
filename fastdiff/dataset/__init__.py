"""Synthetic datasets: many images per caption into resumable webdataset shards.

`fastdiff.dataset.build(captions, out, ...)` (and `fastdiff dataset CAPTIONS --out DIR`):
image j of caption i uses seed `seed + i * images_per_caption + j`, shards hold whole captions
and appear only when finished, a rerun resumes, and `ray=` spreads shards over a Ray cluster.
Modules load on first use, so `fastdiff dataset --help` does not import torch.
"""
from __future__ import annotations

__all__ = ["build", "read_captions", "Captions", "seed_of", "sample_key"]


def __getattr__(name):
    if name == "build":
        from fastdiff.dataset.builder import build

        return build
    if name in ("read_captions", "Captions"):
        from fastdiff.dataset import captions

        return getattr(captions, name)
    if name in ("seed_of", "sample_key"):
        from fastdiff.dataset import shards

        return getattr(shards, name)
    raise AttributeError(f"module 'fastdiff.dataset' has no attribute {name!r}")
