"""Add-on networks from files: the one place that both reads (fastdiff.formats) and builds
(fastdiff.models), since models never import formats and formats never import models.

    hn = load_hypernetwork(path, strength=1.0)   # a models.hypernetwork.Hypernetwork
    emb = load_embedding(path)                   # plain data: formats.Embedding
"""
from __future__ import annotations

from fastdiff.formats import load_embedding
from fastdiff.formats.hypernetwork import read_hypernetwork
from fastdiff.models.hypernetwork import Hypernetwork

__all__ = ["load_hypernetwork", "load_embedding"]


def load_hypernetwork(path: str, strength: float = 1.0, name: str | None = None) -> Hypernetwork:
    """An A1111 or NovelAI hypernetwork .pt file as a Hypernetwork (eval mode, no grad) at
    `strength`; `name` overrides the one in the file (else the file name)."""
    f = read_hypernetwork(path, name)
    return Hypernetwork.from_state_dicts(f.name, f.config, f.state_dicts, strength=strength)
