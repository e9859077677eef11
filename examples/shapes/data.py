"""Procedural shapes: 64x64 pictures of one coloured shape on a plain background, with captions.

The data a tiny SD-1.x-architecture model trains on, so that fastdiff's first `generate` draws a
real picture and so that a fidelity checker (checker.py) can tell right numerics from subtly
wrong ones. numpy + pillow only; README.md beside this file documents the grammar and splits.

`sample(index, seed)` is a pure function of its arguments: every random draw comes from a
generator seeded with (seed, index, split, style), never from global state.
"""

from __future__ import annotations

import re

import numpy as np

SIZE = 64  # images are SIZE x SIZE RGB

SHAPES = ("circle", "square", "triangle", "diamond")

# Well separated in RGB: the closest pair (orange/yellow) is ~100 apart, ten times the noise
# a generated image is checked under.
PALETTE = {
    "red": (215, 30, 40),
    "orange": (250, 130, 20),
    "yellow": (245, 230, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (255, 130, 200),
}
BASE_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
# Never shown by the train or heldout splits: the word a textual-inversion embedding learns.
NOVEL_COLOURS = ("pink",)
COLOURS = BASE_COLOURS + NOVEL_COLOURS

# Reading order. The phrase is the caption's last clause.
POSITIONS = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)
POSITION_PHRASES = {p: p for p in POSITIONS} | {"centre": "in the centre"}

STYLES = ("filled", "outlined")

# (shape, colour, background) triples the train split never draws: 22 of the 224 base triples.
# Chosen by (shape_i + 5 * colour_i + background_i) % 9 == 0 over the index orders above, which
# keeps every (shape, colour), (colour, background) and (shape, background) pair in training, so
# the held-out prompts test composition, not unseen words. Written out so it can never drift.
HELDOUT_TRIPLES = (
    ("circle", "orange", "blue"),
    ("circle", "blue", "black"),
    ("circle", "purple", "yellow"),
    ("circle", "black", "orange"),
    ("square", "orange", "green"),
    ("square", "yellow", "black"),
    ("square", "green", "yellow"),
    ("square", "blue", "white"),
    ("square", "purple", "orange"),
    ("square", "white", "purple"),
    ("square", "black", "red"),
    ("triangle", "red", "black"),
    ("triangle", "orange", "yellow"),
    ("triangle", "yellow", "white"),
    ("triangle", "green", "orange"),
    ("triangle", "blue", "purple"),
    ("triangle", "purple", "red"),
    ("triangle", "white", "blue"),
    ("diamond", "red", "white"),
    ("diamond", "yellow", "purple"),
    ("diamond", "green", "red"),
    ("diamond", "white", "green"),
)
_HELDOUT = frozenset(HELDOUT_TRIPLES)

_BASE_TRIPLES = tuple(
    (s, c, b) for s in SHAPES for c in BASE_COLOURS for b in BASE_COLOURS if b != c
)
TRAIN_TRIPLES = tuple(t for t in _BASE_TRIPLES if t not in _HELDOUT)
# A novel colour as the shape or as the background, the other colour a base one.
NOVEL_TRIPLES = tuple(
    (s, c, b)
    for s in SHAPES
    for c in COLOURS
    for b in COLOURS
    if b != c and (c in NOVEL_COLOURS) != (b in NOVEL_COLOURS)
)
SPLITS = {"train": TRAIN_TRIPLES, "heldout": HELDOUT_TRIPLES, "novel": NOVEL_TRIPLES}

# Geometry, in pixels with the image spanning [0, SIZE) and pixel i covering [i, i + 1).
CELL = SIZE / 3
# Shape centres sit a little inside the cell centres (10.7, 32, 53.3) so a corner shape keeps
# clear of the image border, whose colour the checker reads as the background.
GRID_CENTRES = (12.0, 32.0, 52.0)
SIZE_RANGE = (14.0, 17.5)  # side of the shape's bounding box
JITTER = 1.5  # max offset of the box centre from its grid centre, per axis
SUPERSAMPLE = 4  # anti-aliasing: 4x4 coverage samples per pixel


# ---------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(attrs: dict, mention_style: bool = True) -> str:
    """'a red circle on a blue background, top left'; outlines say 'an outlined red circle ...'."""
    noun = f"{attrs['colour']} {attrs['shape']}"
    if mention_style and attrs.get("style", "filled") == "outlined":
        noun = f"outlined {noun}"
    bg = attrs["background"]
    return (
        f"{_article(noun)} {noun} on {_article(bg)} {bg} background, "
        f"{POSITION_PHRASES[attrs['position']]}"
    )


_WORDS = lambda names: "|".join(sorted(names, key=len, reverse=True))  # noqa: E731
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()} | {"in the center": "centre"}
_CAPTION_RE = re.compile(
    rf"^an? (?:(?P<style>outlined|filled) )?(?P<colour>{_WORDS(COLOURS)}) "
    rf"(?P<shape>{_WORDS(SHAPES)}) on an? (?P<background>{_WORDS(COLOURS)}) background, "
    rf"(?P<position>{_WORDS(_PHRASE_TO_POSITION)})\.?$"
)


def parse_caption(text: str) -> dict:
    """Inverse of caption(): the attributes a caption names. Raises ValueError off the grammar."""
    m = _CAPTION_RE.match(" ".join(text.lower().split()))
    if m is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    return {
        "shape": m["shape"],
        "colour": m["colour"],
        "background": m["background"],
        "position": _PHRASE_TO_POSITION[m["position"]],
        "style": m["style"] or "filled",
    }


# ---------------------------------------------------------------------------- rendering


def _signed_distance(shape: str, cx: float, cy: float, side: float, x, y):
    """Distance inside the shape's boundary (negative outside), for points x, y."""
    h = side / 2
    if shape == "circle":
        return h - np.hypot(x - cx, y - cy)
    if shape == "square":
        verts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape == "triangle":  # apex up, base as wide as the shape is tall
        verts = [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape == "diamond":
        verts = [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    # Convex polygon, vertices clockwise on screen (y down): inside every edge's half-plane, and
    # the smallest distance to an edge line is the distance to the boundary.
    dist = None
    for (x0, y0), (x1, y1) in zip(verts, verts[1:] + verts[:1]):
        ex, ey = x1 - x0, y1 - y0
        d = ((x - x0) * -ey + (y - y0) * ex) / np.hypot(ex, ey)
        dist = d if dist is None else np.minimum(dist, d)
    return dist


def _inradius(shape: str, side: float) -> float:
    h = side / 2
    if shape == "triangle":  # twice the area over the perimeter
        return side / (1 + np.sqrt(5))
    return {"circle": h, "square": h, "diamond": h / np.sqrt(2)}[shape]


def outline_width(shape: str, side: float) -> float:
    """Stroke of an outlined shape: 45% of the inradius (the hole stays clearly open), 2-3 px."""
    return float(np.clip(0.45 * _inradius(shape, side), 2.0, 3.0))


def coverage(shape: str, cx: float, cy: float, side: float, style: str = "filled") -> np.ndarray:
    """Fraction [SIZE, SIZE] of each pixel the shape covers (SUPERSAMPLE^2 samples per pixel)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {STYLES}")
    out = np.zeros((SIZE, SIZE))
    # Only the shape's bounding box (plus a pixel) can be covered: sample just that window.
    h = side / 2
    x0, x1 = max(int(np.floor(cx - h)) - 1, 0), min(int(np.ceil(cx + h)) + 1, SIZE)
    y0, y1 = max(int(np.floor(cy - h)) - 1, 0), min(int(np.ceil(cy + h)) + 1, SIZE)
    if x0 >= x1 or y0 >= y1:
        return out
    n = SUPERSAMPLE
    y = (np.arange(y0 * n, y1 * n, dtype=np.float64) + 0.5)[:, None] / n
    x = (np.arange(x0 * n, x1 * n, dtype=np.float64) + 0.5)[None, :] / n
    sd = _signed_distance(shape, cx, cy, side, x, y)
    inside = sd > 0
    if style == "outlined":
        inside &= sd <= outline_width(shape, side)
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, n, x1 - x0, n).mean(axis=(1, 3))
    return out


def render(attrs: dict, side: float = 16.0, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Draw attrs (shape, colour, background, position, style) -> uint8 [SIZE, SIZE, 3].

    side is the bounding box's side in pixels; offset (dx, dy) moves its centre off the grid point.
    """
    row, col = divmod(POSITIONS.index(attrs["position"]), 3)
    cx, cy = GRID_CENTRES[col] + offset[0], GRID_CENTRES[row] + offset[1]
    alpha = coverage(attrs["shape"], cx, cy, side, attrs.get("style", "filled"))[..., None]
    fg = np.array(PALETTE[attrs["colour"]], dtype=np.float64)
    bg = np.array(PALETTE[attrs["background"]], dtype=np.float64)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


# ---------------------------------------------------------------------------- sampling

_SPLIT_CODE = {"train": 0, "heldout": 1, "novel": 2}
_STYLE_CODE = {"filled": 0, "outlined": 1, "mixed": 2}


def _rng(seed: int, index: int, split: str, style: str) -> np.random.Generator:
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; known: {tuple(_SPLIT_CODE)}")
    if style not in _STYLE_CODE:
        raise ValueError(f"unknown style {style!r}; known: {tuple(_STYLE_CODE)}")
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    return np.random.default_rng([int(seed), int(index), _SPLIT_CODE[split], _STYLE_CODE[style]])


def sample_attributes(index: int, seed: int = 0, split: str = "train", style: str = "filled"):
    """(attributes, side, offset) of sample(index, seed, split, style), without drawing it."""
    rng = _rng(seed, index, split, style)
    triples = SPLITS[split]
    shape, colour, background = triples[rng.integers(len(triples))]
    attrs = {
        "shape": shape,
        "colour": colour,
        "background": background,
        "position": POSITIONS[rng.integers(len(POSITIONS))],
        "style": STYLES[rng.integers(2)] if style == "mixed" else style,
    }
    side = float(rng.uniform(*SIZE_RANGE))
    offset = (float(rng.uniform(-JITTER, JITTER)), float(rng.uniform(-JITTER, JITTER)))
    return attrs, side, offset


def sample(index: int, seed: int = 0, split: str = "train", style: str = "filled",
           mention_style: bool = True):
    """-> (image uint8 [64, 64, 3], caption, attributes); a pure function of its arguments.

    split: "train" (base colours, held-out triples excluded), "heldout" (only HELDOUT_TRIPLES),
    "novel" (a NOVEL_COLOURS colour as shape or background). style: "filled", "outlined" or
    "mixed" (either, drawn per sample). mention_style=False keeps "outlined" out of captions,
    as a hypernetwork trained to impose the style would want.
    """
    attrs, side, offset = sample_attributes(index, seed, split, style)
    return render(attrs, side, offset), caption(attrs, mention_style), attrs


def heldout_prompts(n: int = 100, seed: int = 0, style: str = "filled") -> list[tuple[str, dict]]:
    """n (caption, attributes) evaluation prompts over the held-out triples.

    Triples go round-robin in a seeded order so every one is asked ~n/22 times; positions are
    drawn at random.
    """
    rng = np.random.default_rng([int(seed), 0x5EED])
    order = rng.permutation(len(HELDOUT_TRIPLES))
    out = []
    for i in range(n):
        shape, colour, background = HELDOUT_TRIPLES[order[i % len(order)]]
        attrs = {
            "shape": shape,
            "colour": colour,
            "background": background,
            "position": POSITIONS[rng.integers(len(POSITIONS))],
            "style": style,
        }
        out.append((caption(attrs), attrs))
    return out


def contact_sheet(images, columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile uint8 [H, W, 3] images into one grid image (grey padding), for eyeballing."""
    images = [np.asarray(im) for im in images]
    h, w, _ = images[0].shape
    rows = -(-len(images) // columns)
    sheet = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 128, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y:y + h, x:x + w] = im
    return sheet
