"""The procedural shapes data set (examples/shapes) and its fidelity checker."""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.shapes import checker, data  # noqa: E402
from examples.shapes import (  # noqa: E402
    BASE_COLOURS, COLOURS, HELDOUT_TRIPLES, NOVEL_COLOURS, PALETTE, POSITIONS, SHAPES, STYLES,
    TRAIN_TRIPLES, caption, check, heldout_prompts, parse_caption, read, render, sample, score,
)

SPLITS = ("train", "heldout", "novel")
ALL_VALUES = {
    "shape": SHAPES, "colour": COLOURS, "background": COLOURS, "position": POSITIONS,
    "style": STYLES,
}


def _blur121(image: np.ndarray) -> np.ndarray:
    """Slight blur: separable [1, 2, 1] / 4 (a Gaussian of sigma ~0.7 px), edges replicated."""
    x = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    x = (x[:-2] + 2 * x[1:-1] + x[2:]) / 4
    return (x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]) / 4


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _samples(n, seed, splits=SPLITS, styles=STYLES):
    for split, style in itertools.product(splits, styles):
        for i in range(n):
            yield sample(i, seed, split, style)


# ---------------------------------------------------------------------------- generator


def test_sample_contract():
    image, text, attrs = sample(0, 0)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert set(attrs) == {"shape", "colour", "background", "position", "style"}
    assert attrs["style"] == "filled" and "filled" not in text
    assert text == caption(attrs)


def test_sample_reproducible_and_pure():
    first = [sample(i, 123, "train", "mixed") for i in (5, 3, 5)]
    np.random.seed(999)  # global numpy state must not matter
    again = sample(5, 123, "train", "mixed")
    for a, b in ((first[0], first[2]), (first[0], again)):
        assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1] and a[2] == b[2]
    # Another seed (or index) draws another picture, for (nearly) every index.
    differ = sum(sample(i, 1)[0].tobytes() != sample(i, 2)[0].tobytes() for i in range(20))
    assert differ == 20
    assert sample(0, 1)[0].tobytes() != sample(1, 1)[0].tobytes()


def test_sample_rejects_bad_arguments():
    for kwargs in ({"split": "test"}, {"style": "dotted"}, {"seed": -1}):
        with pytest.raises(ValueError):
            sample(0, **({"seed": 0} | kwargs))


def test_splits_are_disjoint_and_documented():
    base = {(s, c, b) for s in SHAPES for c in BASE_COLOURS for b in BASE_COLOURS if b != c}
    held = set(HELDOUT_TRIPLES)
    assert len(held) == len(HELDOUT_TRIPLES) == 22 and held < base
    assert set(TRAIN_TRIPLES) == base - held
    assert 0.08 <= len(held) / len(base) <= 0.12
    for s, c, b in HELDOUT_TRIPLES:  # every pair of a held-out triple is still trained on
        assert any(t[:2] == (s, c) for t in TRAIN_TRIPLES)
        assert any(t[1:] == (c, b) for t in TRAIN_TRIPLES)
        assert any((t[0], t[2]) == (s, b) for t in TRAIN_TRIPLES)
    for names in (SHAPES, BASE_COLOURS):  # every word appears among held-out triples
        assert all(any(n in t for t in HELDOUT_TRIPLES) for n in names)


def test_heldout_triples_never_in_train_split():
    held = set(HELDOUT_TRIPLES)
    seen = set()
    for seed in (0, 1):
        for i in range(3000):
            attrs, _, _ = data.sample_attributes(i, seed, "train", "mixed")
            triple = (attrs["shape"], attrs["colour"], attrs["background"])
            assert triple not in held
            assert attrs["colour"] not in NOVEL_COLOURS and attrs["background"] not in NOVEL_COLOURS
            seen.add(triple)
    assert seen == set(TRAIN_TRIPLES)  # and the train split does reach every other triple
    for i in range(300):
        attrs, _, _ = data.sample_attributes(i, 0, "heldout", "filled")
        assert (attrs["shape"], attrs["colour"], attrs["background"]) in held
        attrs, _, _ = data.sample_attributes(i, 0, "novel", "filled")
        assert (attrs["colour"] in NOVEL_COLOURS) != (attrs["background"] in NOVEL_COLOURS)


def test_all_positions_styles_and_shapes_drawn():
    got = {k: set() for k in ("shape", "position", "style")}
    for i in range(200):
        attrs, side, (dx, dy) = data.sample_attributes(i, 0, "train", "mixed")
        assert data.SIZE_RANGE[0] <= side <= data.SIZE_RANGE[1]
        assert max(abs(dx), abs(dy)) <= data.JITTER
        for k in got:
            got[k].add(attrs[k])
    assert got == {"shape": set(SHAPES), "position": set(POSITIONS), "style": set(STYLES)}


def test_palette_well_separated():
    rgb = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert d[~np.eye(len(COLOURS), dtype=bool)].min() >= 100


def test_outlined_has_background_inside():
    attrs = {"shape": "square", "colour": "red", "background": "blue", "position": "centre",
             "style": "outlined"}
    image = render(attrs, side=17.0)
    assert tuple(image[32, 32]) == PALETTE["blue"]  # the middle is background
    assert tuple(image[32, 25]) == PALETTE["red"]  # the stroke, 1 px inside the left edge
    assert tuple(render(attrs | {"style": "filled"}, side=17.0)[32, 32]) == PALETTE["red"]


# ---------------------------------------------------------------------------- captions


def test_caption_grammar_examples():
    base = {"shape": "circle", "colour": "red", "background": "blue", "style": "filled"}
    assert caption(base | {"position": "top left"}) == "a red circle on a blue background, top left"
    assert caption(base | {"position": "centre", "colour": "orange", "background": "white"}) == (
        "an orange circle on a white background, in the centre")
    out = base | {"position": "bottom", "style": "outlined", "background": "orange"}
    assert caption(out) == "an outlined red circle on an orange background, bottom"
    assert caption(out, mention_style=False) == "a red circle on an orange background, bottom"


def test_captions_parse_back():
    for split, style in itertools.product(SPLITS, ("filled", "outlined", "mixed")):
        for i in range(40):
            _, text, attrs = sample(i, 7, split, style)
            assert parse_caption(text) == attrs
    assert parse_caption("  A Red  Circle on a blue background, in the center. ") == {
        "shape": "circle", "colour": "red", "background": "blue", "position": "centre",
        "style": "filled"}
    for bad in ("a red circle", "a red circle on a blue background, middle",
                "a teal circle on a blue background, top",
                "a red hexagon on a blue background, top",
                "a red circle on a blue background, top left and more"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_heldout_prompts():
    prompts = heldout_prompts(100, seed=3)
    assert len(prompts) == 100 and prompts == heldout_prompts(100, seed=3)
    assert prompts != heldout_prompts(100, seed=4)
    triples = [(a["shape"], a["colour"], a["background"]) for _, a in prompts]
    assert set(triples) == set(HELDOUT_TRIPLES)  # 100 round-robin over 22: all asked
    for text, attrs in prompts:
        assert parse_caption(text) == attrs


# ---------------------------------------------------------------------------- checker


def test_checker_perfect_on_clean_images():
    n = 0
    for seed in range(5):
        for image, _, attrs in _samples(30, seed):
            result = check(image, attrs)
            assert result == {k: True for k in (*checker.ATTRIBUTES, "all")}, (attrs, read(image))
            n += 1
    assert n == 5 * 3 * 2 * 30


def test_checker_accepts_pil_and_other_sizes():
    image, _, attrs = sample(4, 0, "train", "outlined")
    assert check(Image.fromarray(image), attrs)["all"]
    big = np.asarray(Image.fromarray(image).resize((128, 128), Image.NEAREST))
    assert check(big, attrs)["all"]
    with pytest.raises(ValueError):
        check(image.astype(np.float32), attrs)


def test_checker_robust_to_noise_and_blur():
    rng = np.random.default_rng(0)
    images, attrs = [], []
    for image, _, a in _samples(50, 11):
        images.append(_to_uint8(_blur121(image) + rng.normal(0, 10, image.shape)))
        attrs.append(a)
    result = score(images, attrs)
    assert result["n"] == 300
    assert result["all"] >= 0.98, result


def test_checker_reads_blurred_outlines():
    # A Gaussian of sigma 1 px dilutes a 2-3 px stroke toward the background: still readable.
    images, attrs = [], []
    for image, _, a in _samples(20, 13, styles=("outlined",)):
        images.append(np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0))))
        attrs.append(a)
    assert score(images, attrs)["all"] >= 0.98


def test_checker_robust_to_colour_shift():
    rng = np.random.default_rng(1)
    images, attrs = [], []
    for image, _, a in _samples(12, 12):
        images.append(_to_uint8(image.astype(np.float64) + rng.uniform(-20, 20, 3)))
        attrs.append(a)
    assert score(images, attrs)["all"] >= 0.98


def test_checker_rejects_wrong_labels():
    for image, _, attrs in _samples(3, 5):
        for key, values in ALL_VALUES.items():
            for value in values:
                if value == attrs[key] or (key == "background" and value == attrs["colour"]):
                    continue
                result = check(image, attrs | {key: value})
                assert not result[key] and not result["all"], (attrs, key, value)


@pytest.mark.parametrize("colour", COLOURS)
def test_checker_rejects_uniform_images(colour):
    rng = np.random.default_rng(2)
    flat = np.full((64, 64, 3), PALETTE[colour], np.uint8)
    for image in (flat, _to_uint8(flat + rng.normal(0, 10, flat.shape))):
        got = read(image)
        assert got["background"] == colour
        assert got["shape"] is got["colour"] is got["position"] is got["style"] is None
        other = next(c for c in BASE_COLOURS if c != colour)
        attrs = {"shape": "circle", "colour": other, "background": colour, "position": "centre"}
        result = check(image, attrs)
        assert result["background"] and not result["all"]
        assert not (result["shape"] or result["colour"] or result["position"] or result["style"])


def test_checker_rejects_noise_images():
    rng = np.random.default_rng(3)
    attrs = {"shape": "circle", "colour": "red", "background": "blue", "position": "centre"}
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(10)]
    noise += [_to_uint8(rng.normal(128, 60, (64, 64, 3))) for _ in range(5)]
    for image in noise:
        assert read(image)["background"] is None
        assert not any(check(image, attrs).values())
    # Smooth colour fields (upsampled 4x4 noise): never a shape.
    for _ in range(10):
        small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        image = np.asarray(small.resize((64, 64), Image.BICUBIC))
        assert read(image)["shape"] is None


def test_checker_rejects_two_shapes_and_wrong_geometry():
    a = {"shape": "circle", "colour": "red", "background": "blue", "position": "top left",
         "style": "filled"}
    one = render(a)
    other = render(a | {"shape": "square", "position": "bottom right"})
    second = (other != PALETTE["blue"]).any(-1, keepdims=True)
    both = np.where(second, other, one)
    assert check(one, a)["all"]
    assert read(both)["shape"] is None and not check(both, a)["all"]
    # A long bar and an upside-down triangle are none of the shapes.
    bar = np.full((64, 64, 3), PALETTE["blue"], np.uint8)
    bar[28:36, 8:56] = PALETTE["red"]
    assert read(bar)["shape"] is None
    # A shape in no named colour has no colour.
    alpha = data.coverage("circle", 32.0, 32.0, 16.0)[..., None]
    blue = np.array(PALETTE["blue"], np.float64)
    grey = _to_uint8(blue + alpha * (np.array([128.0, 128.0, 128.0]) - blue))
    assert read(grey)["colour"] is None and not check(grey, a | {"position": "centre"})["all"]
    flipped = render(a | {"shape": "triangle", "position": "centre"})[::-1].copy()
    got = read(flipped)
    assert got["colour"] == "red" and got["shape"] is None


def test_score_fractions():
    images, attrs = [], []
    for i in range(8):
        image, _, a = sample(i, 9)
        images.append(image)
        wrong_shape = next(s for s in SHAPES if s != a["shape"])
        attrs.append(a if i % 2 else a | {"shape": wrong_shape})
    result = score(np.stack(images), attrs)
    assert result["n"] == 8
    assert result["shape"] == 0.5 and result["all"] == 0.5
    assert result["colour"] == result["background"] == result["position"] == result["style"] == 1.0
    with pytest.raises(ValueError):
        score(images, attrs[:-1])


def test_torch_dataset():
    torch = pytest.importorskip("torch")
    from examples.shapes.dataset import ShapesDataset

    ds = ShapesDataset(6, seed=2, split="heldout")
    item = ds[3]
    image, text, attrs = sample(3, 2, "heldout")
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    expected = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(item["pixel_values"], expected)
    assert item["caption"] == text and item["attributes"] == attrs
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and len(batch["caption"]) == 3
