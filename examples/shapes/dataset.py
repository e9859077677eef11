"""torch Dataset over the shapes generator (the only part of examples/shapes that needs torch)."""

from __future__ import annotations

import torch

from .data import sample


class ShapesDataset(torch.utils.data.Dataset):
    """`length` samples of one split: {"pixel_values": float32 [3, 64, 64] in [-1, 1],
    "caption": str, "attributes": dict}. Item i is sample(i, seed, split, style)."""

    def __init__(self, length: int, seed: int = 0, split: str = "train", style: str = "filled",
                 mention_style: bool = True):
        self.length, self.seed, self.split, self.style = length, seed, split, style
        self.mention_style = mention_style

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        image, text, attrs = sample(i, self.seed, self.split, self.style, self.mention_style)
        pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return {"pixel_values": pixels, "caption": text, "attributes": attrs}
