"""A call's arguments checked before any work starts, and the image input/output around it.

`check_request` turns the keyword arguments of `Pipeline.__call__` / `generate()` into a
`Request`, raising ValueError (or FileNotFoundError) naming the bad argument and value.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
import random
from dataclasses import dataclass, replace

import numpy as np
import torch

from fastdiff import sampling

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEED = 2**32 - 1
MAX_EMPHASIS = 1000.0  # |(word:w)| beyond this overflows fp16 contexts; A1111 users stay near 1
MAX_GUIDANCE = 1000.0


@dataclass(frozen=True)
class Limits:
    """What one call may ask for. `check_request` refuses more, in milliseconds, naming the
    limit; `load(limits=...)` / `Pipeline(limits=...)` set a pipeline's, and `LIMITS` is the
    default. None: no limit. Pixels are width x height; `max_batch_pixels` counts every image
    of a call (their latents are all allocated when it starts)."""

    max_steps: int | None = 10000
    max_side: int | None = 8192
    max_pixels: int | None = 4096 * 4096
    max_batch_pixels: int | None = 1024 * 512 * 512
    max_images: int | None = 10000
    max_prompt_chars: int | None = 20000

    def with_(self, **changes) -> "Limits":
        return replace(self, **changes)


LIMITS = Limits()


@dataclass
class Request:
    """One call's arguments, checked before any work starts."""

    prompts: list
    negs: list
    steps: int
    guidance_scale: float
    sampler: str
    schedule: str
    seed: int
    width: int | None
    height: int | None
    num_images: int
    batch_size: int | None
    hypernetworks: list
    clip_skip: int
    init_image: object
    strength: float
    output_type: str
    embeddings: tuple = ()


def _int(name, v, low=1):
    """An integer argument (numpy integers too; bools are not numbers here)."""
    if isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    try:
        v = operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}") from None
    if v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return v


def _real(name, v) -> float:
    """A finite real number (numpy floats too; bools refused)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return v


def _texts(name, value, *, allow_none=False) -> list:
    if value is None and allow_none:
        return [""]
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    got = type(value).__name__ if not isinstance(value, (list, tuple)) else \
        ("an empty list" if not value else f"a list holding {type(next(p for p in value if not isinstance(p, str))).__name__}")
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {got}")


def check_prompt_text(name, text: str, limits: Limits) -> None:
    """Length and emphasis weights of one prompt, checked before anything is tokenised."""
    from fastdiff.prompts import parse_attention

    if limits.max_prompt_chars is not None and len(text) > limits.max_prompt_chars:
        raise ValueError(f"{name} is {len(text)} characters; the limit is {limits.max_prompt_chars} (max_prompt_chars)")
    for run, w in parse_attention(text):
        if (run, w) != ("BREAK", -1.0) and not (math.isfinite(w) and abs(w) <= MAX_EMPHASIS):
            raise ValueError(f"{name}: emphasis weight {w:g} on {run[:40]!r} is outside "
                             f"[-{MAX_EMPHASIS:g}, {MAX_EMPHASIS:g}]")


def check_size(width: int, height: int, images: int, limits: Limits) -> None:
    """Sides, pixels per image and per call against `limits` (ValueError naming the limit)."""
    for name, v in (("width", width), ("height", height)):
        if limits.max_side is not None and v > limits.max_side:
            raise ValueError(f"{name} must be at most {limits.max_side} (max_side), got {v}")
    if limits.max_pixels is not None and width * height > limits.max_pixels:
        raise ValueError(f"width x height must be at most {limits.max_pixels} pixels (max_pixels), "
                         f"got {width}x{height}")
    if limits.max_batch_pixels is not None and width * height * images > limits.max_batch_pixels:
        raise ValueError(f"num_images x width x height must be at most {limits.max_batch_pixels} pixels in one call "
                         f"(max_batch_pixels), got {images} x {width}x{height}")


def check_request(prompt, *, negative_prompt="", steps=20, guidance_scale=7.0,
                  sampler="euler_ancestral", schedule="normal", seed=None, width=None, height=None,
                  num_images=1, batch_size=None, hypernetworks=(), clip_skip=1, init_image=None,
                  strength=0.75, output_type="pil", embeddings=(), limits: Limits | None = None) -> Request:
    """Every argument checked, with a message naming the bad value, before anything loads.
    `limits` (default `LIMITS`) bounds steps, sizes, images and prompt length."""
    limits = LIMITS if limits is None else limits
    prompts = _texts("prompt", prompt)
    negs = _texts("negative_prompt", negative_prompt, allow_none=True)
    if len(negs) == 1:
        negs = negs * len(prompts)
    if len(negs) != len(prompts):
        raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
    if not isinstance(sampler, str) or sampler not in sampling.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(sampling.SAMPLERS)}")
    if not isinstance(schedule, str) or schedule not in sampling.SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(sampling.SCHEDULES)}")
    steps = _int("steps", steps)
    if limits.max_steps is not None and steps > limits.max_steps:
        raise ValueError(f"steps must be at most {limits.max_steps} (max_steps), got {steps}")
    size = {}
    for name, v in (("width", width), ("height", height)):
        if v is not None:
            try:
                v = _int(name, v, 8)
            except ValueError:
                v = -1
            if v < 8 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {(width, height)[name == 'height']!r}")
        size[name] = v
    width, height = size["width"], size["height"]
    num_images = _int("num_images", num_images)
    batch_size = None if batch_size is None else _int("batch_size", batch_size)
    clip_skip = _int("clip_skip", clip_skip)
    guidance_scale = _real("guidance_scale", guidance_scale)
    if abs(guidance_scale) > MAX_GUIDANCE:
        raise ValueError(f"guidance_scale must be in [-{MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}], got {guidance_scale!r}")
    if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    total = len(prompts) * num_images
    if limits.max_images is not None and total > limits.max_images:
        raise ValueError(f"num_images x prompts must be at most {limits.max_images} images in one call "
                         f"(max_images), got {total}")
    # the size is checked where it is known; the native size in Pipeline.submit
    check_size(width or 8, height or 8, total, limits)
    for name, texts in (("prompt", prompts), ("negative_prompt", negs)):
        for t in dict.fromkeys(texts):
            check_prompt_text(name, t, limits)
    if seed is None:  # leave room for seed + total - 1
        seed = random.SystemRandom().randrange(MAX_SEED - total + 2)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) \
            or not (0 <= seed and seed + total - 1 <= MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED - total + 1}] for {total} images, got {seed!r}")
    seed = int(seed)
    hns = list(hn_pairs(hypernetworks))
    for path, s in hns:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"hypernetwork {path} does not exist")
    embeddings = embedding_paths(embeddings)
    for e in embeddings:
        if not os.path.isfile(e):
            raise FileNotFoundError(f"embedding {e} does not exist")
    if isinstance(strength, (bool, np.bool_)) or not isinstance(strength, numbers.Real) or not (0.0 < strength <= 1.0):
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if init_image is not None:
        init_image = open_init_image(init_image, limits)
    return Request(prompts, negs, steps, guidance_scale, sampler, schedule, seed, width, height,
                   num_images, batch_size, hns, clip_skip, init_image, float(strength), output_type, embeddings)


def hn_pairs(hypernetworks):
    """Paths or (path, strength) pairs -> [(path, strength)]; a single path is one."""
    if isinstance(hypernetworks, (str, os.PathLike)):
        hypernetworks = [hypernetworks]
    if not isinstance(hypernetworks, (list, tuple)):
        raise ValueError(f"hypernetworks must be a list of paths or (path, strength) pairs, "
                         f"got {type(hypernetworks).__name__}")
    for h in hypernetworks:
        if isinstance(h, (tuple, list)):
            if len(h) != 2 or not isinstance(h[0], (str, os.PathLike)):
                raise ValueError(f"hypernetworks: each item is a path or a (path, strength) pair, got {h!r}")
            try:
                s = _real("strength", h[1])
            except ValueError:
                raise ValueError(f"hypernetwork strength must be a finite number, got {h[1]!r} for {h[0]}") from None
            yield os.fspath(h[0]), s
        elif isinstance(h, (str, os.PathLike)):
            yield os.fspath(h), 1.0
        else:
            raise ValueError(f"hypernetworks: each item is a path or a (path, strength) pair, got {h!r}")


def embedding_paths(embeddings) -> tuple:
    """A list of embedding file paths (a lone string is refused: it is not a list of paths)."""
    if isinstance(embeddings, (str, bytes, os.PathLike)):
        raise ValueError(f"embeddings must be a list of paths, got the single {type(embeddings).__name__} "
                         f"{os.fspath(embeddings)!r} (write [{os.fspath(embeddings)!r}])")
    if not isinstance(embeddings, (list, tuple)) or not all(isinstance(e, (str, os.PathLike)) for e in embeddings):
        raise ValueError(f"embeddings must be a list of paths, got {embeddings!r:.80}")
    return tuple(os.fspath(e) for e in embeddings)


def img2img_steps(strength: float, steps: int) -> int:
    """A1111 img2img samples t_enc + 1 steps, t_enc = int(min(strength, 0.999) * steps)
    (sd_samplers_kdiffusion: sigmas[steps - t_enc - 1:]); strength 1: all of them."""
    return int(min(strength, 0.999) * steps) + 1


def progress_bar(total, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", desc="fastdiff")


INIT_MODES = ("RGB", "RGBA", "L")


def open_init_image(image, limits: Limits | None = None):
    """A path, PIL image or [3, H, W] tensor in [0, 1], checked (not yet resized). A file's
    size is read from its header and checked against max_pixels before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    limits = LIMITS if limits is None else limits
    cap = limits.max_pixels
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"init image {path} does not exist")
        try:
            image = Image.open(path)
            w, h = image.size
            if cap is not None and w * h > cap:
                raise ValueError(f"init image {path} is {w}x{h}, more than max_pixels {cap}")
            image.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
            raise ValueError(f"init image {path} is not a readable image: {e}") from None
    if isinstance(image, Image.Image):
        if image.mode not in INIT_MODES:
            raise ValueError(f"init image has mode {image.mode!r}; give an {', '.join(INIT_MODES)} image")
        if cap is not None and image.size[0] * image.size[1] > cap:
            raise ValueError(f"init image is {image.size[0]}x{image.size[1]}, more than max_pixels {cap}")
        return image
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"init image tensor must be float [3, H, W] in [0, 1], got {image.dtype} {list(image.shape)}")
        if cap is not None and image.shape[1] * image.shape[2] > cap:
            raise ValueError(f"init image tensor is {image.shape[2]}x{image.shape[1]}, more than max_pixels {cap}")
        lo, hi = image.aminmax() if image.numel() else (torch.tensor(0.0), torch.tensor(0.0))
        if not (torch.isfinite(lo) and torch.isfinite(hi) and lo >= 0 and hi <= 1):
            raise ValueError(f"init image tensor must hold values in [0, 1], found [{float(lo):g}, {float(hi):g}]")
        return image
    raise ValueError(f"init_image must be a path, a PIL image or a tensor, got {type(image).__name__}")


def init_tensor(image, width, height) -> torch.Tensor:
    """-> [1, 3, height, width] in [-1, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        t = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    else:
        t = image.float()
        if tuple(t.shape[1:]) != (height, width):
            raise ValueError(f"init image tensor is {t.shape[2]}x{t.shape[1]}, asked for {width}x{height}")
    return (t * 2 - 1)[None]


def convert(images: torch.Tensor, output_type: str):
    if output_type in ("pt", "latent"):
        return images.cpu()
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    if output_type == "np":
        return arr
    from PIL import Image

    return [Image.fromarray(a) for a in arr]
