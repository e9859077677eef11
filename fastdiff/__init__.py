"""fastdiff: a compiled inference engine for Stable Diffusion-family models.

Public surface: ``load()``, ``generate()``, ``Pipeline``. Heavy modules import lazily so
``import fastdiff`` and ``fastdiff --help`` stay fast.
"""
from __future__ import annotations

from fastdiff._version import __version__

__all__ = ["load", "generate", "Pipeline", "__version__"]


def __getattr__(name):
    if name in ("load", "generate"):
        from fastdiff import loader

        return getattr(loader, name)
    if name == "Pipeline":
        from fastdiff.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
