"""A call's arguments checked before any work starts, and the image input/output around it.

`check_request` turns the keyword arguments of `Pipeline.__call__` / `generate()` into a
`Request`, raising ValueError (or FileNotFoundError) naming the bad argument and value.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from fastdiff import sampling

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEED = 2**32 - 1


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


def check_request(prompt, *, negative_prompt="", steps=20, guidance_scale=7.0,
                  sampler="euler_ancestral", schedule="normal", seed=None, width=None, height=None,
                  num_images=1, batch_size=None, hypernetworks=(), clip_skip=1, init_image=None,
                  strength=0.75, output_type="pil") -> Request:
    """Every argument checked, with a message naming the bad value, before anything loads."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negs) == 1:
        negs = negs * len(prompts)
    if len(negs) != len(prompts):
        raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
    if sampler not in sampling.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(sampling.SAMPLERS)}")
    if schedule not in sampling.SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(sampling.SCHEDULES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    for name, v in (("width", width), ("height", height)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 8 or v % 8):
            raise ValueError(f"{name} must be a positive multiple of 8, got {v!r}")
    for name, v in (("num_images", num_images), ("batch_size", batch_size or 1), ("clip_skip", clip_skip)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    total = len(prompts) * num_images
    if seed is None:  # leave room for seed + total - 1
        seed = random.SystemRandom().randrange(MAX_SEED - total + 2)
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed and seed + total - 1 <= MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED - total + 1}] for {total} images, got {seed!r}")
    hns = list(hn_pairs(hypernetworks))
    for path, s in hns:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"hypernetwork {path} does not exist")
        if not math.isfinite(s):
            raise ValueError(f"hypernetwork strength must be finite, got {s!r} for {path}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (0.0 < strength <= 1.0):
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if init_image is not None:
        init_image = open_init_image(init_image)
    return Request(prompts, negs, steps, float(guidance_scale), sampler, schedule, seed, width, height,
                    num_images, batch_size, hns, clip_skip, init_image, float(strength), output_type)


def hn_pairs(hypernetworks):
    if isinstance(hypernetworks, (str, os.PathLike)):
        hypernetworks = [hypernetworks]
    for h in hypernetworks:
        if isinstance(h, (tuple, list)):
            yield os.fspath(h[0]), float(h[1])
        else:
            yield os.fspath(h), 1.0


def img2img_steps(strength: float, steps: int) -> int:
    """A1111 img2img samples t_enc + 1 steps, t_enc = int(min(strength, 0.999) * steps)
    (sd_samplers_kdiffusion: sigmas[steps - t_enc - 1:]); strength 1: all of them."""
    return int(min(strength, 0.999) * steps) + 1


def batches(keys, size) -> list:
    """Indices 0..len(keys)-1 cut into runs of equal consecutive keys, at most `size` long."""
    runs = []
    for i, k in enumerate(keys):
        if runs and len(runs[-1]) < size and keys[runs[-1][0]] == k:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def progress_bar(total, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", desc="fastdiff")


INIT_MODES = ("RGB", "RGBA", "L")


def open_init_image(image):
    """A path, PIL image or [3, H, W] tensor in [0, 1], checked (not yet resized)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"init image {path} does not exist")
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"init image {path} is not a readable image: {e}") from None
    if isinstance(image, Image.Image):
        if image.mode not in INIT_MODES:
            raise ValueError(f"init image has mode {image.mode!r}; give an {', '.join(INIT_MODES)} image")
        return image
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"init image tensor must be float [3, H, W] in [0, 1], got {image.dtype} {list(image.shape)}")
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
