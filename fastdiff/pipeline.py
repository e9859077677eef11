"""prompt -> tokens -> context -> C++ sampling loop -> VAE -> images.

`load()` builds a Pipeline from any supported checkpoint; `generate()` is load + call with a
small cache of loaded pipelines, so a script calling it in a loop loads the model once.
"""
from __future__ import annotations

import math
import os
import random
import threading
from dataclasses import dataclass

import numpy as np
import torch

from fastdiff import __version__, ops, sampling
from fastdiff.denoiser import Denoiser, DiscreteSigmas
from fastdiff.graphs import GraphCache
from fastdiff.results import GenerationResult, parameters_text

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEED = 2**32 - 1


@dataclass
class ModelInfo:
    family: str  # "sd1" | "sd2"
    prediction_type: str  # "epsilon" | "v_prediction"
    alphas_cumprod: np.ndarray
    native_size: int  # pixels, e.g. 512 or 768
    vae_scale: float
    name: str = ""
    hash: object = None  # str() gives A1111's short model hash (computed on first use)
    path: str = ""


@dataclass
class _Request:
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
                  strength=0.75, output_type="pil") -> _Request:
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
    hns = list(_hn_pairs(hypernetworks))
    for path, s in hns:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"hypernetwork {path} does not exist")
        if not math.isfinite(s):
            raise ValueError(f"hypernetwork strength must be finite, got {s!r} for {path}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (0.0 < strength <= 1.0):
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if init_image is not None:
        init_image = _open_init_image(init_image)
    return _Request(prompts, negs, steps, float(guidance_scale), sampler, schedule, seed, width, height,
                    num_images, batch_size, hns, clip_skip, init_image, float(strength), output_type)


class Pipeline:
    """A loaded model. Its parts are public for parity checks and advanced use:
    `pipe.unet(x, t, context)`, `pipe.vae.encode(images)`, `pipe.vae.decode(latents)`,
    `pipe.encode_prompt(prompts, clip_skip=1)`.

    Calls are serialised by a lock: concurrent calls on one pipeline never mix state
    (hooks, hypernetwork strengths, embeddings), they queue.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, info: ModelInfo, *, device, dtype,
                 cuda_graphs: bool | None = None, channels_last: bool = False):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.info = info
        self.device = torch.device(device)
        self.dtype = dtype
        self.schedule = DiscreteSigmas(info.alphas_cumprod)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels
        self.embeddings: dict[str, torch.Tensor] = {}  # name -> [n, dim]
        self.hypernetworks: list = []  # loaded with load_hypernetwork: applied on every call
        self._call_hns: dict = {}  # (path, k) -> k-th Hypernetwork of that file in a call
        self._active_hypernetworks: list = []  # during a call: the stack its kv_hook applies
        self._lock = threading.RLock()
        # The fast path: on CUDA, each sampling step replays a captured graph of the denoiser.
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, this pipeline is on {self.device}")
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.graphs = GraphCache(channels_last=self.channels_last) if cuda_graphs else None

    def __repr__(self) -> str:
        i = self.info
        return (f"Pipeline({i.path!r}, {i.family}, {i.prediction_type}, {i.native_size}px, "
                f"device={self.device}, dtype={self.dtype})")

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, prompts, clip_skip: int = 1, *, n_chunks: int | None = None) -> torch.Tensor:
        """Prompts (A1111 syntax) -> context [B, 77*k, dim]; every prompt gets the same k (the
        longest prompt's, or `n_chunks`). Textual-inversion names in the text are replaced by
        their vectors; emphasis is applied as A1111's "Original" mode does."""
        from fastdiff import prompts as P

        if isinstance(prompts, str):
            prompts = [prompts]
        with self._lock, torch.inference_mode():
            counts = {name: v.shape[0] for name, v in self.embeddings.items()}
            bt = P.tokenize_batch(list(prompts), self.tokenizer, counts, n_chunks=n_chunks)
            B, k = bt.ids.shape[0], bt.n_chunks
            embeds = self.text_encoder.token_embedding(bt.ids.to(self.device))  # [B, 77k, dim]
            for row, chunk, pos, name in bt.fixes:
                vec = self.embeddings[name]
                start = chunk * (P.CHUNK_LENGTH + 2) + pos
                embeds[row, start:start + vec.shape[0]] = vec
            dim = embeds.shape[-1]
            z = self.text_encoder(inputs_embeds=embeds.view(B * k, -1, dim), clip_skip=clip_skip)
            return P.apply_emphasis(z.reshape(B, -1, dim), bt.weights)  # [B, 77k, dim]

    # ------------------------------------------------------------------ add-ons

    def load_embedding(self, path, token=None) -> str:
        """A textual-inversion embedding, used by writing `token` (default: the name stored in
        the file, else the file name) in a prompt. Returns that token. A file that cannot be
        used (unreadable, wrong width) raises and leaves the pipeline as it was."""
        from fastdiff.formats import load_embedding

        emb = load_embedding(os.fspath(path), name=token)
        emb.check_width(self.text_encoder.config.hidden_size)
        with self._lock:
            self.embeddings[emb.name] = emb.vectors.to(self.device, self.dtype)
        return emb.name

    def load_hypernetwork(self, path, strength: float = 1.0):
        """Add an A1111/NovelAI hypernetwork, applied on every later call (stacked in load
        order) until `unload_hypernetworks()`. Returns it: set `.strength` to change the
        strength for later calls, no reload needed. For a single call, pass
        `hypernetworks=[(path, strength)]` to the call instead."""
        hn = self._read_hypernetwork(path, strength)
        with self._lock:
            self.hypernetworks.append(hn)
        return hn

    def unload_hypernetworks(self) -> None:
        with self._lock:
            self.hypernetworks.clear()

    def _read_hypernetwork(self, path, strength):
        from fastdiff.formats import load_hypernetwork

        hn = load_hypernetwork(os.fspath(path), strength=float(strength))
        ctx_widths = {m.to_k.in_features for m in self.unet.attention_modules()}
        if not ctx_widths & set(hn.dims):
            raise ValueError(f"hypernetwork {path}: its widths {hn.dims} match none of this model's "
                             f"attention inputs {sorted(ctx_widths)}")
        return hn.to(self.device, self.dtype).eval().requires_grad_(False)

    def _call_hypernetworks(self, pairs) -> list:
        """The hypernetworks a call names, as (path, strength) pairs, read once and cached. The
        same file twice in one call is two hypernetworks, each at its own strength."""
        out = []
        for n, (path, s) in enumerate(pairs):
            key = (path, [p for p, _ in pairs[:n]].count(path))
            if key not in self._call_hns:
                self._call_hns[key] = self._read_hypernetwork(path, s)
            self._call_hns[key].strength = s
            out.append(self._call_hns[key])
        return out

    def _set_kv_hook(self, hook) -> None:
        for m in self.unet.attention_modules():
            m.kv_hook = hook

    # ------------------------------------------------------------------ generation

    def __call__(self, prompt, *, negative_prompt="", steps=20, guidance_scale=7.0,
                 sampler="euler_ancestral", schedule="normal", seed=None, width=None,
                 height=None, num_images=1, batch_size=None, hypernetworks=(), embeddings=(),
                 clip_skip=1, init_image=None, strength=0.75, output_type="pil", callback=None,
                 eta=1.0, s_noise=1.0, progress=False, latents=None) -> GenerationResult:
        """Generate images. Image i of the call uses seed + i whatever the batching; `seed`
        None draws one (reported in the result's parameters). `hypernetworks`: paths or
        (path, strength) pairs for this call only; `embeddings`: embedding files to load
        first. `latents`: the initial noise [N, C, h, w] (unit variance) instead of the seeds'.
        `callback({i, x, sigma, denoised})` is called after each step."""
        req = prompt if isinstance(prompt, _Request) else check_request(
            prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
            sampler=sampler, schedule=schedule, seed=seed, width=width, height=height,
            num_images=num_images, batch_size=batch_size, hypernetworks=hypernetworks,
            clip_skip=clip_skip, init_image=init_image, strength=strength, output_type=output_type)
        width = req.width or self.info.native_size
        height = req.height or self.info.native_size
        for name, v in (("width", width), ("height", height)):
            if v % self.vae_factor:
                raise ValueError(f"{name} {v} is not a multiple of this model's VAE factor {self.vae_factor}")
        total = len(req.prompts) * req.num_images
        shape = (self.latent_channels, height // self.vae_factor, width // self.vae_factor)
        if latents is not None and tuple(latents.shape) != (total, *shape):
            raise ValueError(f"latents must be {[total, *shape]}, got {list(latents.shape)}")
        init = _init_tensor(req.init_image, width, height) if req.init_image is not None else None
        for item in embeddings:
            self.load_embedding(item)
        batch = req.batch_size or min(total, 8)

        with self._lock, torch.inference_mode():
            active = self.hypernetworks + self._call_hypernetworks(req.hypernetworks)
            self._active_hypernetworks = active
            self._set_kv_hook(_stack(active))
            jobs = [(pi, i) for pi in range(len(req.prompts)) for i in range(req.num_images)]
            ks = self._chunk_counts(req)
            outputs, params = [], []
            per_image = req.steps if req.init_image is None else _img2img_steps(req.strength, req.steps)
            bar = _progress(total * per_image, progress)  # image-steps
            try:
                for run in _batches([ks[pi] for pi, _ in jobs], batch):
                    start, chunk = run[0], [jobs[j] for j in run]
                    seeds = [req.seed + j for j in run]
                    lat = self._sample(
                        req, [req.prompts[pi] for pi, _ in chunk], [req.negs[pi] for pi, _ in chunk], seeds,
                        shape=shape, init=init, callback=callback, eta=eta, s_noise=s_noise, bar=bar,
                        n_chunks=ks[chunk[0][0]],
                        latents=None if latents is None else latents[start:start + len(chunk)])
                    outputs.append(lat if req.output_type == "latent" else self.decode(lat))
                    for (pi, _), s in zip(chunk, seeds):
                        params.append(self._parameters(req, pi, s, width, height, active))
            finally:
                self._set_kv_hook(None)
                self._active_hypernetworks = []
                if bar is not None:
                    bar.close()
        images = _convert(torch.cat(outputs), req.output_type)
        if req.output_type == "pil":  # as A1111's images: image.info["parameters"] is the infotext
            for img, p in zip(images, params):
                img.info["parameters"] = parameters_text(p)
        return GenerationResult(images, params, req.output_type)

    def _parameters(self, req, pi, seed, width, height, active) -> dict:
        return dict(
            prompt=req.prompts[pi], negative_prompt=req.negs[pi], steps=req.steps, sampler=req.sampler,
            schedule=req.schedule, guidance_scale=req.guidance_scale, seed=seed, width=width,
            height=height, clip_skip=req.clip_skip,
            strength=req.strength if req.init_image is not None else None,
            model_hash=str(self.info.hash) if self.info.hash is not None else None,
            model_name=self.info.name,
            hypernetworks=", ".join(f"{h.name}:{h.strength:g}" for h in active),
            version=__version__,
        )

    def _chunk_counts(self, req) -> list:
        """CLIP chunks per prompt of a call: its own count, with CFG the larger of it and its
        negative prompt's (cond and uncond share a UNet batch). Only images with equal counts
        share a batch, so no prompt is padded because of another prompt of the call."""
        from fastdiff import prompts as P

        counts = {name: v.shape[0] for name, v in self.embeddings.items()}

        def n(text):
            return len(P.tokenize(text, self.tokenizer, counts))

        return [max(n(p), n(q) if req.guidance_scale != 1.0 else 1) for p, q in zip(req.prompts, req.negs)]

    def _sample(self, req, prompts, negs, seeds, *, shape, init, callback, eta, s_noise, bar, latents, n_chunks):
        # One CPU generator per image, for the initial noise and every later noise draw: the
        # same seed gives the same image at any batch size and on any device.
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        cuda = self.device.type == "cuda"

        def draw():
            n = torch.stack([torch.randn(shape, generator=g) for g in gens])
            # pinned + non_blocking: the copy queues behind the running step instead of
            # waiting for it (a pageable copy would synchronise the loop every step)
            return n.pin_memory().to(self.device, non_blocking=True) if cuda else n

        noise = draw() if latents is None else latents.to(self.device, torch.float32)
        if req.guidance_scale == 1.0:
            cond, uncond = self.encode_prompt(prompts, req.clip_skip, n_chunks=n_chunks), None
        else:
            ctx = self.encode_prompt(list(negs) + list(prompts), req.clip_skip, n_chunks=n_chunks)
            uncond, cond = ctx.chunk(2)
        sig = sampling.sigmas(req.schedule, req.steps, self.info.alphas_cumprod)
        if init is not None:
            # The last steps of the full schedule, from the encoded image (the latent mean)
            # noised to the first one's sigma.
            sig = sig[req.steps - _img2img_steps(req.strength, req.steps):]
            x0 = self.encode_images(init.to(self.device)).expand(len(seeds), -1, -1, -1)
            x = x0 + noise * float(sig[0])
        else:
            x = noise * float(sig[0])
        extra = None
        if self.unet.config.in_channels == 2 * self.latent_channels + 1:
            # Inpainting UNet, no mask given: everything is to be painted (mask 1; the masked
            # image is mid-grey), as A1111 conditions txt2img on inpainting checkpoints.
            grey = torch.zeros(len(seeds), 3, shape[1] * self.vae_factor, shape[2] * self.vae_factor,
                               device=self.device)
            extra = torch.cat([torch.ones(len(seeds), 1, *shape[1:], device=self.device),
                               self.encode_images(grey)], dim=1)
        den = self._denoiser(cond, uncond, req.guidance_scale, extra, (len(seeds), *shape))

        def cb(d):
            if bar is not None:
                bar.update(len(seeds))
            if callback is not None:
                callback(d)

        return sampling.sample(den, x, sig, req.sampler, noise_sampler=lambda s, sn: draw(),
                               callback=cb, eta=eta, s_noise=s_noise)

    def _denoiser(self, cond, uncond, guidance_scale, extra, latent_shape):
        if self.graphs is None:
            return Denoiser(self.unet, self.schedule, self.info.prediction_type, cond, uncond,
                            guidance_scale, ops.lincomb, self.dtype, extra)
        cfg = guidance_scale != 1.0
        context = torch.cat([uncond, cond]) if cfg else cond
        active = self._active_hypernetworks
        graph = self.graphs.get(
            self.unet, self.schedule, self.info.prediction_type, batch=latent_shape[0],
            latent_shape=latent_shape[1:], cfg=cfg, context_shape=context.shape[1:], dtype=self.dtype,
            extra_channels=0 if extra is None else extra.shape[1], hypernetworks=active, device=self.device)
        return graph.bind(context, guidance_scale, extra)

    def warmup(self, shapes=((1, None, None),), *, guidance: bool = True, chunks: int = 1,
               hypernetworks=()) -> int:
        """Capture the CUDA graphs for `shapes` — (batch, height, width) in pixels, None for
        the native size — ahead of the first call, so a service's first request is as fast as
        its last. `chunks`: prompt length in 75-token chunks. Returns the number of graphs
        held. A no-op (0) without CUDA graphs."""
        if self.graphs is None:
            return 0
        with self._lock, torch.inference_mode():
            self._active_hypernetworks = self.hypernetworks + self._call_hypernetworks(list(_hn_pairs(hypernetworks)))
            self._set_kv_hook(_stack(self._active_hypernetworks))
            try:
                dim = self.text_encoder.config.hidden_size
                in_ch = self.unet.config.in_channels
                extra = in_ch - self.latent_channels if in_ch == 2 * self.latent_channels + 1 else 0
                for batch, height, width in shapes:
                    h = (height or self.info.native_size) // self.vae_factor
                    w = (width or self.info.native_size) // self.vae_factor
                    self.graphs.get(
                        self.unet, self.schedule, self.info.prediction_type, batch=batch,
                        latent_shape=(self.latent_channels, h, w), cfg=guidance,
                        context_shape=(77 * chunks, dim), dtype=self.dtype, extra_channels=extra,
                        hypernetworks=self._active_hypernetworks, device=self.device)
            finally:
                self._set_kv_hook(None)
                self._active_hypernetworks = []
        return len(self.graphs.graphs)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> scaled latents (the distribution's mean), float32."""
        with torch.inference_mode():
            moments = self.vae.encode(images.to(self.device, self.dtype))
            return self.vae.latent_mean(moments).float() * self.info.vae_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1], float32 [B, 3, H, W]."""
        with torch.inference_mode():
            img = self.vae.decode((latents / self.info.vae_scale).to(self.device, self.dtype)).float()
            return ((img + 1) / 2).clamp(0, 1)


def _stack(active):
    from fastdiff.formats import HypernetworkStack

    return HypernetworkStack(active) if active else None


def _hn_pairs(hypernetworks):
    if isinstance(hypernetworks, (str, os.PathLike)):
        hypernetworks = [hypernetworks]
    for h in hypernetworks:
        if isinstance(h, (tuple, list)):
            yield os.fspath(h[0]), float(h[1])
        else:
            yield os.fspath(h), 1.0


def _img2img_steps(strength: float, steps: int) -> int:
    """A1111 img2img samples t_enc + 1 steps, t_enc = int(min(strength, 0.999) * steps)
    (sd_samplers_kdiffusion: sigmas[steps - t_enc - 1:]); strength 1: all of them."""
    return int(min(strength, 0.999) * steps) + 1


def _batches(keys, size) -> list:
    """Indices 0..len(keys)-1 cut into runs of equal consecutive keys, at most `size` long."""
    runs = []
    for i, k in enumerate(keys):
        if runs and len(runs[-1]) < size and keys[runs[-1][0]] == k:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _progress(total, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", desc="fastdiff")


INIT_MODES = ("RGB", "RGBA", "L")


def _open_init_image(image):
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


def _init_tensor(image, width, height) -> torch.Tensor:
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


def _convert(images: torch.Tensor, output_type: str):
    if output_type in ("pt", "latent"):
        return images.cpu()
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    if output_type == "np":
        return arr
    from PIL import Image

    return [Image.fromarray(a) for a in arr]


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
         channels_last=False) -> Pipeline:
    """Load any supported checkpoint: a diffusers folder or a single .safetensors/.ckpt file
    (SD 1.x/2.x, eps or v, inpainting); `vae` replaces its VAE with a standalone VAE file.
    No path: the small model that ships with fastdiff.

    device defaults to CUDA when present; dtype to float16 on CUDA and float32 on CPU.
    `config` overrides what was detected (see fastdiff.formats.open_model). `cuda_graphs`
    (default: on for CUDA) replays one captured graph per sampling step; `channels_last`
    stores the UNet's convolutions NHWC."""
    from fastdiff.loader import load_pipeline

    device, dtype = _device_dtype(device, dtype)
    return load_pipeline(path, device=device, dtype=dtype, config=config, vae=vae,
                         cuda_graphs=cuda_graphs, channels_last=channels_last)


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def generate(prompt, *, model=None, device=None, dtype=None, embeddings=(), callback=None,
             eta=1.0, s_noise=1.0, progress=False, latents=None, **kwargs) -> GenerationResult:
    """Load the model (once: the last one stays cached) and generate. Arguments as
    Pipeline.__call__; they are checked before the model loads."""
    req = check_request(prompt, **kwargs)
    for e in embeddings:
        if not os.path.isfile(e):
            raise FileNotFoundError(f"embedding {e} does not exist")
    device, dtype = _device_dtype(device, dtype)
    key = (os.path.realpath(model) if model is not None else None, str(device), str(dtype))
    with _CACHE_LOCK:
        pipe = _CACHE.get(key)
        if pipe is None:
            _CACHE.clear()  # keep one model resident
            pipe = _CACHE[key] = load(model, device=device, dtype=dtype)
    return pipe(req, embeddings=embeddings, callback=callback, eta=eta, s_noise=s_noise,
                progress=progress, latents=latents)
