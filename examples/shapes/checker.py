"""Fidelity checker: reads the attributes of a shapes picture back off its pixels.

`read(image)` knows nothing about what the picture was meant to show; `check(image, attrs)`
compares its reading with attrs. The steps, each of which can decline (None) rather than guess:

1. background: per-channel median of a 2-px border ring; the ring must be mostly that colour,
   and the colour within COLOUR_TOL of a named one.
2. shape colour: the pixels far from the background; the strongest tenth of them (the shape's
   core, past anti-aliased or blurred edges) gives one colour (median), named by the palette
   colour it is near, or (a thin stroke diluted by blur) that it lies between the background and,
   at least DILUTION of the way.
3. mask: pixels past the midpoint from background to the named colour; its largest 8-connected
   component is the shape, its holes (background not 4-connected to the border) filled.
4. shape class: the ideal template (the generator's drawing code, fitted to the filled mask's
   area and centroid) with the highest IoU, if that IoU is at least MIN_IOU; more than a little
   foreground elsewhere (a second shape, blotches) reads as no shape at all.
5. style: mask area / filled area: ~1 for filled shapes, ~0.45-0.79 for outlines.
6. position: the bounding box centre's cell in the 3x3 grid (the generator places box centres,
   so a triangle's low centroid does not bias it).

Images of another size are resampled to 64x64 (box filter) first. Save images as PNG (or JPEG
without chroma subsampling): 4:2:0 JPEG halves the colour resolution, which thin outlines on
backgrounds of similar brightness do not survive.
"""

from __future__ import annotations

import numpy as np

from .data import COLOURS, PALETTE, POSITIONS, SHAPES, SIZE, coverage

ATTRIBUTES = ("background", "colour", "shape", "position", "style")

COLOUR_TOL = 60.0  # max RGB distance from a named colour (the closest named pair is ~100 apart)
BORDER = 2  # width of the ring the background is read from
BORDER_AGREE = 0.75  # fraction of the ring that must be within FG_DIST of its median
FG_DIST = 48.0  # RGB distance from the background beyond which a pixel is foreground
MIN_AREA = 30  # smallest shape, in pixels (generated ones are >= ~95)
MAX_AREA = 0.25 * SIZE * SIZE
CLUTTER = 0.15  # foreground outside the shape, as a fraction of the shape's area, that is tolerated
MIN_IOU = 0.8  # generated shapes score >= ~0.95 with their template (>= ~0.86 noisy and blurred)
SOLID = 0.86  # mask area / filled area above this: filled; below: outlined
# A 2-3 px stroke blurred by a 1 px Gaussian keeps >= ~75% of its contrast at its centre line;
# its colour may be that diluted (and then must lie within BLEND_TOL of the line to the background).
DILUTION = 0.7
BLEND_TOL = 25.0
CORE = 0.9  # quantile of distance from the background above which pixels are the shape's core

_NAMES = COLOURS
_RGB = np.array([PALETTE[c] for c in _NAMES], dtype=np.float64)  # [K, 3]


def _as_array(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):  # PIL image
        image = np.asarray(image.convert("RGB"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    if image.shape[:2] != (SIZE, SIZE):
        from PIL import Image

        image = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BOX))
    return image.astype(np.float64)


def _nearest_colour(rgb) -> tuple[str | None, float]:
    d = np.linalg.norm(_RGB - rgb, axis=1)
    k = int(np.argmin(d))
    return (_NAMES[k] if d[k] <= COLOUR_TOL else None), float(d[k])


def _shape_colour(core_rgb, bg_rgb, bg_name) -> str | None:
    """Name of the shape colour whose core (least blended pixels) is core_rgb, on bg_rgb.

    A colour c qualifies if core_rgb is within COLOUR_TOL of it, or lies on the line from the
    background to c (within BLEND_TOL) at least DILUTION of the way: a blurred stroke, not some
    other colour. Of those, the one whose segment [bg + DILUTION (c - bg), c] is nearest wins.
    """
    best, best_d = None, np.inf
    for name, c in zip(_NAMES, _RGB):
        if name == bg_name:
            continue
        ab = c - bg_rgb
        t = np.dot(core_rgb - bg_rgb, ab) / max(np.dot(ab, ab), 1e-9)
        off_line = np.linalg.norm(core_rgb - (bg_rgb + t * ab))
        if np.linalg.norm(core_rgb - c) > COLOUR_TOL and not (
            DILUTION <= t <= 1 and off_line <= BLEND_TOL
        ):
            continue
        d = np.linalg.norm(core_rgb - (bg_rgb + np.clip(t, DILUTION, 1.0) * ab))
        if d < best_d:
            best, best_d = name, d
    return best


def _dilate(m: np.ndarray) -> np.ndarray:
    """3x3 (8-neighbour) binary dilation."""
    r = m.copy()
    r[1:] |= m[:-1]
    r[:-1] |= m[1:]
    c = r.copy()
    c[:, 1:] |= r[:, :-1]
    c[:, :-1] |= r[:, 1:]
    return c


def _box3(m: np.ndarray) -> np.ndarray:
    """3x3 mean (zero padded)."""
    p = np.pad(m.astype(np.float64), 1)
    r = p[:-2] + p[1:-1] + p[2:]
    return (r[:, :-2] + r[:, 1:-1] + r[:, 2:]) / 9


def _dilate4(m: np.ndarray) -> np.ndarray:
    """Cross-shaped (4-neighbour) binary dilation."""
    r = m.copy()
    r[1:] |= m[:-1]
    r[:-1] |= m[1:]
    r[:, 1:] |= m[:, :-1]
    r[:, :-1] |= m[:, 1:]
    return r


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a non-empty mask: each component's highest pixel id
    spreads through it until nothing changes, then the most common id wins."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        rows = labels.copy()
        np.maximum(rows[1:], labels[:-1], out=rows[1:])
        np.maximum(rows[:-1], labels[1:], out=rows[:-1])
        grown = rows.copy()
        np.maximum(grown[:, 1:], rows[:, :-1], out=grown[:, 1:])
        np.maximum(grown[:, :-1], rows[:, 1:], out=grown[:, :-1])
        grown *= mask
        if (grown == labels).all():
            break
        labels = grown
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == np.argmax(counts)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """mask plus the background it encloses (not 4-connected to the outside of its box)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.pad(mask[y0:y1, x0:x1], 1)  # a free ring around the box, flooded inward
    outside = np.zeros_like(crop)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    while True:
        grown = _dilate4(outside) & ~crop
        if (grown == outside).all():
            break
        outside = grown
    filled = mask.copy()
    filled[y0:y1, x0:x1] = ~outside[1:-1, 1:-1]
    return filled


# Each shape's area over its bounding box's, and how far below the box centre its centroid sits
# (in sides): what fitting a template to a mask's area and centroid needs.
_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "diamond": 0.0}


def template_ious(filled: np.ndarray) -> dict:
    """IoU of a filled mask with each ideal shape fitted to the mask's area and centroid.

    Unlike the bounding box, area and centroid are not biased by anti-aliased tips or blur.
    """
    ys, xs = np.nonzero(filled)
    area, mx, my = len(xs), xs.mean() + 0.5, ys.mean() + 0.5  # pixel i spans [i, i + 1)
    out = {}
    for shape in SHAPES:
        side = np.sqrt(area / _AREA[shape])
        t = coverage(shape, mx, my - _CENTROID_DROP[shape] * side, side) > 0.5
        out[shape] = float((filled & t).sum() / max((filled | t).sum(), 1))
    return out


def read(image) -> dict:
    """The attributes an image shows: background, colour, shape, position, style (None: unreadable).

    Also returns diagnostics: 'iou' (best template), 'solidity', 'area'.
    """
    img = _as_array(image)
    out = {a: None for a in ATTRIBUTES} | {"iou": 0.0, "solidity": 0.0, "area": 0}

    ring = np.ones((SIZE, SIZE), bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    border = img[ring]
    bg = np.median(border, axis=0)
    if np.mean(np.linalg.norm(border - bg, axis=1) < FG_DIST) < BORDER_AGREE:
        return out  # no plain background: nothing else can be read either
    out["background"], _ = _nearest_colour(bg)

    dist = np.linalg.norm(img - bg, axis=2)  # [H, W]
    far = dist > FG_DIST
    if far.sum() < MIN_AREA:
        return out
    strong = dist[far]
    core = img[far][strong >= np.quantile(strong, CORE)]
    colour = _shape_colour(np.median(core, axis=0), bg, out["background"])
    if colour is None:
        return out
    out["colour"] = colour

    fg = _RGB[_NAMES.index(colour)]
    axis = fg - bg
    t = np.einsum("hwc,c->hw", img - bg, axis) / np.dot(axis, axis)
    mask = t > 0.5
    if not mask.any():
        return out
    shape = _largest_component(mask)
    filled = _fill_holes(shape)
    area = int(filled.sum())
    out["area"] = area
    # Anti-aliased and blurred fringes lie just outside the mask; anything further out is clutter
    # if most of its 3x3 neighbourhood is far too (lone noisy pixels are not).
    near = _dilate(_dilate(filled))
    clutter = (_box3(far) > 4.5 / 9) & ~near
    clutter = int(clutter.sum())
    if not MIN_AREA <= area <= MAX_AREA or clutter > CLUTTER * area:
        return out

    ys, xs = np.nonzero(filled)
    w, h = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
    if 0.6 <= w / h <= 1 / 0.6:  # every shape is drawn as tall as it is wide
        ious = template_ious(filled)
        best = max(ious, key=ious.get)
        out["iou"] = ious[best]
        out["shape"] = best if ious[best] >= MIN_IOU else None
    out["solidity"] = float(shape.sum() / area)
    out["style"] = "filled" if out["solidity"] >= SOLID else "outlined"

    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    col, row = min(int(cx * 3 // SIZE), 2), min(int(cy * 3 // SIZE), 2)
    out["position"] = POSITIONS[3 * row + col]
    return out


def check(image, attributes: dict) -> dict:
    """Per-attribute booleans (background, colour, shape, position, style) and 'all'.

    attributes: as sample() returns them; a missing 'style' means filled. Deterministic.
    """
    got = read(image)
    want = {"style": "filled"} | dict(attributes)
    res = {a: got[a] is not None and got[a] == want[a] for a in ATTRIBUTES}
    res["all"] = all(res.values())
    return res


def score(images, attributes) -> dict:
    """Fraction of images right per attribute and fully ('all'), plus 'n'."""
    results = [check(im, at) for im, at in zip(images, attributes, strict=True)]
    if not results:
        raise ValueError("score() needs at least one image")
    keys = ATTRIBUTES + ("all",)
    return {k: sum(r[k] for r in results) / len(results) for k in keys} | {"n": len(results)}
