"""Checkpoint on disk -> built, loaded modules -> Pipeline; `load()` and `generate()`.

The networks are built on the meta device (no memory, no random init) and their tensors are
streamed in one at a time by `formats.load_into`, straight to the target device and dtype. A
model is only handed out once every part has loaded: a failure leaves nothing half-built.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import torch

from fastdiff._core import alphas_cumprod as _alphas_cumprod
from fastdiff.formats import FormatError, ModelSource, load_into, open_model, open_vae
from fastdiff.pipeline import ModelInfo, Pipeline
from fastdiff.request import check_request

# The model fastdiff ships: used when no model is given.
DEFAULT_MODEL = Path(__file__).parent / "data" / "shapes-model"


def default_model() -> str:
    if not DEFAULT_MODEL.is_dir():
        raise FileNotFoundError(
            f"no model given and the bundled model is missing ({DEFAULT_MODEL}); pass model=PATH "
            "(a diffusers folder or a .safetensors/.ckpt single file)"
        )
    return str(DEFAULT_MODEL)


def alphas_cumprod(scheduler: dict) -> np.ndarray:
    """The training noise schedule from a diffusers scheduler config, in float64."""
    trained = scheduler.get("trained_betas")
    try:
        return np.asarray(_alphas_cumprod(
            str(scheduler.get("beta_schedule", "scaled_linear")), float(scheduler.get("beta_start", 0.00085)),
            float(scheduler.get("beta_end", 0.012)), int(scheduler.get("num_train_timesteps", 1000)),
            [float(b) for b in trained] if trained is not None else []), dtype=np.float64)
    except ValueError as e:
        raise FormatError(f"scheduler config: {e}") from None


def native_size(src: ModelSource) -> int:
    """The image size the model was trained at, in pixels."""
    sample = src.unet.config.get("sample_size")
    if src.vae is not None and isinstance(sample, int) and sample > 0:
        return sample * 2 ** (len(src.vae.config.get("block_out_channels", [0] * 4)) - 1)
    return 768 if (src.family == "sd2" and src.prediction_type == "v_prediction") else 512


class ModelHash:
    """A1111's model hash (sha256 of the weights file, first 10 hex digits), computed once, on
    first use, since hashing a multi-GB file takes seconds. For a diffusers folder the hash is
    of the UNet's first weights file."""

    def __init__(self, src: ModelSource):
        if os.path.isdir(src.path):
            files = sorted({lt.file.path for lt in src.unet.tensors.values()})
            self.path = files[0] if files else None
        else:
            self.path = src.path
        self._value = None
        self._lock = threading.Lock()

    def __str__(self) -> str:
        with self._lock:
            if self._value is None and self.path is not None:
                h = hashlib.sha256()
                with open(self.path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        h.update(block)
                self._value = h.hexdigest()[:10]
            return self._value or ""


def _build(cls, component, device, dtype):
    with torch.device("meta"):
        module = cls(component.config)
    load_into(module, component, device=device, dtype=dtype)
    return module.eval().requires_grad_(False)


def load_pipeline(path, *, device: torch.device, dtype: torch.dtype, config=None, vae=None,
                  **pipeline_options):
    from fastdiff.models.clip import CLIPTextEncoder
    from fastdiff.models.unet import UNet2DCondition
    from fastdiff.models.vae import AutoencoderKL
    from fastdiff.tokenizer import CLIPTokenizer, default_tokenizer

    path = default_model() if path is None else os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path} does not exist")
    src = open_model(path, config)
    if vae is not None:
        src = src.with_vae(open_vae(os.fspath(vae)))
    for part in ("vae", "text_encoder"):
        if getattr(src, part) is None:
            raise FormatError(f"{path}: has no {part.replace('_', ' ')}; fastdiff needs a whole model "
                              "(UNet, VAE and text encoder)")
    pad = src.tokenizer.get("pad_token_id")
    tok = CLIPTokenizer.from_folder(src.tokenizer["path"], pad_id=pad) if src.tokenizer.get("path") \
        else default_tokenizer(pad)

    unet = _build(UNet2DCondition, src.unet, device, dtype)
    vae_m = _build(AutoencoderKL, src.vae, device, dtype)
    text = _build(CLIPTextEncoder, src.text_encoder, device, dtype)
    if text.config.vocab_size < tok.vocab_size:
        raise FormatError(f"{path}: text encoder has {text.config.vocab_size} token embeddings, "
                          f"the tokenizer needs {tok.vocab_size}")
    ctx = unet.config.cross_attention_dim
    ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
    if ctx != text.config.hidden_size:
        raise FormatError(f"{path}: UNet cross-attention width {ctx} does not match the text encoder's "
                          f"{text.config.hidden_size}")
    info = ModelInfo(
        family=src.family, prediction_type=src.prediction_type,
        alphas_cumprod=alphas_cumprod(src.scheduler), native_size=native_size(src),
        vae_scale=float(vae_m.scaling_factor), name=Path(path).stem if os.path.isfile(path) else Path(path).name,
        hash=ModelHash(src), path=path,
    )
    return Pipeline(unet, vae_m, text, tok, info, device=device, dtype=dtype, **pipeline_options)


# ---------------------------------------------------------------------- load / generate

def _device_dtype(device, dtype):
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but torch sees no CUDA device")
    if isinstance(dtype, str):
        if dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
        dtype = getattr(torch, dtype)
    return device, dtype or (torch.float16 if device.type == "cuda" else torch.float32)


def load(path=None, *, device=None, dtype=None, config=None, vae=None, cuda_graphs=None,
         channels_last=False, max_batch=None, limits=None) -> Pipeline:
    """Load any supported checkpoint: a diffusers folder or a single .safetensors/.ckpt file
    (SD 1.x/2.x, eps or v, inpainting); `vae` replaces its VAE with a standalone VAE file.
    No path: the small model that ships with fastdiff.

    device defaults to CUDA when present; dtype to float16 on CUDA and float32 on CPU.
    `config` overrides what was detected (see fastdiff.formats.open_model). `cuda_graphs`
    (default: on for CUDA) replays captured graphs of the UNet; `channels_last` stores the
    UNet's convolutions NHWC; `max_batch` caps the images in one UNet call (default 8 on
    CUDA, 4 on CPU); `limits` (fastdiff.request.Limits) bounds steps, sizes, images and
    prompt length per call (default: fastdiff.request.LIMITS)."""
    device, dtype = _device_dtype(device, dtype)
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    return load_pipeline(path, device=device, dtype=dtype, config=config, vae=vae,
                         cuda_graphs=cuda_graphs, channels_last=channels_last, max_batch=max_batch, limits=limits)


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def generate(prompt, *, model=None, device=None, dtype=None, embeddings=(), callback=None,
             eta=1.0, s_noise=1.0, progress=False, latents=None, hypernetwork_dir=None, **kwargs):
    """Load the model (once: the last one stays cached) and generate. Arguments as
    Pipeline.submit; they are checked before the model loads. A model that fails to load
    leaves the cached one in place."""
    if hypernetwork_dir is not None:  # <hypernet:NAME:MULTIPLIER> tags -> (path, multiplier)
        from fastdiff.prompts import hypernetwork_tags
        from fastdiff.request import hn_pairs

        prompt, tagged = hypernetwork_tags(prompt, hypernetwork_dir)
        kwargs["hypernetworks"] = [*hn_pairs(kwargs.get("hypernetworks", ())), *tagged]
    req = check_request(prompt, embeddings=embeddings, **kwargs)
    device, dtype = _device_dtype(device, dtype)
    key = (os.path.realpath(model) if model is not None else None, str(device), str(dtype))
    with _CACHE_LOCK:
        pipe = _CACHE.get(key)
        if pipe is None:
            pipe = load(model, device=device, dtype=dtype)  # raises before the cached model goes
            _CACHE.clear()  # keep one model resident
            _CACHE[key] = pipe
    return pipe(req, callback=callback, eta=eta, s_noise=s_noise, progress=progress, latents=latents)
