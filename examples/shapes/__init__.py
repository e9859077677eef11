"""Procedural shapes data set and its fidelity checker (see README.md)."""

from .checker import check, read, score
from .data import (
    BASE_COLOURS,
    COLOURS,
    HELDOUT_TRIPLES,
    NOVEL_COLOURS,
    PALETTE,
    POSITIONS,
    SHAPES,
    STYLES,
    TRAIN_TRIPLES,
    caption,
    heldout_prompts,
    parse_caption,
    render,
    sample,
)

__all__ = [
    "BASE_COLOURS", "COLOURS", "HELDOUT_TRIPLES", "NOVEL_COLOURS", "PALETTE", "POSITIONS",
    "SHAPES", "STYLES", "TRAIN_TRIPLES", "caption", "check", "heldout_prompts", "parse_caption",
    "read", "render", "sample", "score",
]
