"""The Pipeline: a loaded model and the facade over its engine.

A call (`pipe(...)`, or `pipe.submit(...)` for a handle) is checked, its prompts are encoded,
and each of its images becomes an engine Job with its own sampler state, seed-keyed noise
generator and conditioning; the engine batches the model evaluations of every running job —
of this call and of any other call, from any thread — into shared UNet calls. When the call's
jobs finish their latents are decoded here, in the caller's thread.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from fastdiff import sampling
from fastdiff._version import __version__
from fastdiff.denoiser import BatchDenoiser, Conditioning, ModelSchedule
from fastdiff.engine import Cancelled, Engine, Job
from fastdiff.graphs import GraphCache
from fastdiff.request import (Limits, Request, check_request, check_size, convert, embedding_paths, hn_pairs,
                              img2img_steps, init_tensor, progress_bar)
from fastdiff.results import GenerationResult, parameters_text

__all__ = ["Pipeline", "ModelInfo", "GenerationHandle", "Cancelled"]

CONTEXT_CACHE = 256  # prompt contexts kept per pipeline
ADDON_CACHE = 8  # per-call hypernetwork modules and embedding files kept per pipeline


def file_key(path) -> tuple:
    """A file's identity for caches: a file replaced at the same path is another file."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


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


class Pipeline:
    """A loaded model. Its parts are public for parity checks and advanced use:
    `pipe.unet(x, t, context)`, `pipe.vae.encode(images)`, `pipe.vae.decode(latents)`,
    `pipe.encode_prompt(prompts, clip_skip=1)`, `pipe.engine`.

    Thread-safe: concurrent calls share UNet batches (continuous batching); each call's
    add-ons, strengths and prompts are fixed when it starts. `max_batch` caps the images in one
    UNet call (default 8 on CUDA, 4 on CPU). `limits` (a fastdiff.request.Limits; default the
    module's LIMITS) bounds what one call may ask for.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, info: ModelInfo, *, device, dtype,
                 cuda_graphs: bool | None = None, channels_last: bool = False, max_batch: int | None = None,
                 limits: Limits | None = None):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.info = info
        self.device = torch.device(device)
        self.dtype = dtype
        self.schedule = ModelSchedule(list(np.asarray(info.alphas_cumprod, dtype=np.float64)))
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels
        self.embeddings: dict[str, torch.Tensor] = {}  # name -> [n, dim]
        self.hypernetworks: list = []  # loaded with load_hypernetwork: applied on every call
        self.limits = limits  # None: fastdiff.request.LIMITS at call time
        # (file_key, k) -> the k-th hypernetwork module of that file named in a call; LRU
        self._call_hns: OrderedDict = OrderedDict()
        self._call_embs: OrderedDict = OrderedDict()  # file_key -> (name, [n, dim]) of per-call embedding files
        self._contexts: OrderedDict = OrderedDict()  # (text, chunks, clip_skip, embeddings) -> [1, 77k, dim]
        self._embeddings_version = 0
        self._lock = threading.RLock()  # guards the add-on tables above
        cuda = self.device.type == "cuda"
        if cuda_graphs is None:
            cuda_graphs = cuda
        if cuda_graphs and not cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA device, this pipeline is on {self.device}")
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.denoiser = BatchDenoiser(unet, self.schedule, info.prediction_type, dtype=dtype, device=self.device,
                                      channels_last=self.channels_last, min_rows=1 if cuda else 2)
        self.engine = Engine(self.denoiser, max_batch=(8 if cuda else 4) if max_batch is None else max_batch)
        self.graphs = GraphCache(channels_last=self.channels_last) if cuda_graphs else None

    @property
    def graphs(self) -> GraphCache | None:
        """The CUDA graphs of the UNet calls (None: eager)."""
        return self.denoiser.graphs

    @graphs.setter
    def graphs(self, cache) -> None:
        if cache is not None:
            cache.exclusive = self.engine.device_lock.exclusive
        self.denoiser.graphs = cache

    def __repr__(self) -> str:
        i = self.info
        return (f"Pipeline({i.path!r}, {i.family}, {i.prediction_type}, {i.native_size}px, "
                f"device={self.device}, dtype={self.dtype})")

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, prompts, clip_skip: int = 1, *, n_chunks: int | None = None,
                      extra_embeddings: dict | None = None) -> torch.Tensor:
        """Prompts (A1111 syntax) -> context [B, 77*k, dim]; every prompt gets the same k (the
        longest prompt's, or `n_chunks`). Textual-inversion names in the text are replaced by
        their vectors; emphasis is applied as A1111's "Original" mode does. `extra_embeddings`
        {name: [n, dim]}: more (a call's own), over the loaded ones."""
        from fastdiff import prompts as P

        if isinstance(prompts, str):
            prompts = [prompts]
        with self._lock:
            embeddings = dict(self.embeddings)
        embeddings.update(extra_embeddings or {})
        with torch.inference_mode():
            counts = {name: v.shape[0] for name, v in embeddings.items()}
            bt = P.tokenize_batch(list(prompts), self.tokenizer, counts, n_chunks=n_chunks)
            B, k = bt.ids.shape[0], bt.n_chunks
            embeds = self.text_encoder.token_embedding(bt.ids.to(self.device))  # [B, 77k, dim]
            for row, chunk, pos, name in bt.fixes:
                vec = embeddings[name]
                start = chunk * (P.CHUNK_LENGTH + 2) + pos
                embeds[row, start:start + vec.shape[0]] = vec
            dim = embeds.shape[-1]
            z = self.text_encoder(inputs_embeds=embeds.view(B * k, -1, dim), clip_skip=clip_skip)
            return P.apply_emphasis(z.reshape(B, -1, dim), bt.weights)  # [B, 77k, dim]

    def _context(self, text: str, clip_skip: int, n_chunks: int, extra: tuple = ()) -> torch.Tensor:
        """One prompt's context [1, 77k, dim], encoded alone (so it is the same whatever else a
        call holds) and kept in a small LRU cache: a service sees the same negative prompts
        again and again. `extra`: the call's own embeddings, ((file_key, name, [n, dim]), ...)."""
        with self._lock:
            key = (text, n_chunks, clip_skip, self._embeddings_version, tuple((k, n) for k, n, _ in extra))
            ctx = self._contexts.get(key)
            if ctx is not None:
                self._contexts.move_to_end(key)
                return ctx
        ctx = self.encode_prompt([text], clip_skip, n_chunks=n_chunks, extra_embeddings={n: v for _, n, v in extra})
        with self._lock:
            self._contexts[key] = ctx
            while len(self._contexts) > CONTEXT_CACHE:
                self._contexts.popitem(last=False)
        return ctx

    def _chunk_count(self, text: str, extra: tuple = ()) -> int:
        from fastdiff import prompts as P

        with self._lock:
            counts = {name: v.shape[0] for name, v in self.embeddings.items()}
        counts.update({n: v.shape[0] for _, n, v in extra})
        return len(P.tokenize(text, self.tokenizer, counts))

    # ------------------------------------------------------------------ add-ons

    def load_embedding(self, path, token=None) -> str:
        """A textual-inversion embedding, used by writing `token` (default: the name stored in
        the file, else the file name) in a prompt. Returns that token. A file that cannot be
        used (unreadable, wrong width) raises and leaves the pipeline as it was."""
        from fastdiff.formats import load_embedding

        name, vectors = self._read_embedding(path, token)
        with self._lock:
            self.embeddings[name] = vectors
            self._embeddings_version += 1
        return name

    def _read_embedding(self, path, token=None) -> tuple:
        """(token, [n, dim] on the device): the file read, its width checked against the text
        encoder, its token checked against the vocabulary."""
        import warnings

        from fastdiff.formats import FormatError, load_embedding

        emb = load_embedding(os.fspath(path), name=token)
        emb.check_width(self.text_encoder.config.hidden_size)
        ids = self.tokenizer.encode(emb.name)
        if not ids:
            raise FormatError(f"embedding {path}: its token {emb.name!r} is no text a prompt can hold; pass token=...")
        if len(ids) == 1 and self.tokenizer.decode(ids).strip() == emb.name.strip().lower():
            warnings.warn(f"embedding {path}: its token {emb.name!r} is an ordinary word of the vocabulary; "
                          f"every {emb.name!r} in a prompt now means the embedding (pass token=... to choose another)",
                          stacklevel=3)
        return emb.name, emb.vectors.to(self.device, self.dtype)

    def _call_embeddings(self, paths) -> tuple:
        """A call's own embedding files -> ((file_key, name, [n, dim]), ...), each file read once
        while it is unchanged (a small LRU). They apply to that call only."""
        out = []
        for path in paths:
            try:
                key = file_key(path)
            except OSError as e:
                from fastdiff.formats import FormatError

                raise FormatError(f"{path}: no such file or directory ({e.strerror})") from None
            with self._lock:
                hit = self._call_embs.get(key)
                if hit is not None:
                    self._call_embs.move_to_end(key)
            if hit is None:
                hit = self._read_embedding(path)
                with self._lock:
                    self._call_embs[key] = hit
                    while len(self._call_embs) > ADDON_CACHE:
                        self._call_embs.popitem(last=False)
            out.append((key, *hit))
        return tuple(out)

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
        from fastdiff.addons import load_hypernetwork

        hn = load_hypernetwork(os.fspath(path), strength=float(strength))
        ctx_widths = {m.to_k.in_features for m in self.unet.attention_modules()}
        if not ctx_widths & set(hn.dims):
            raise ValueError(f"hypernetwork {path}: its widths {hn.dims} match none of this model's "
                             f"attention inputs {sorted(ctx_widths)}")
        return hn.to(self.device, self.dtype).eval().requires_grad_(False)

    def _hypernetwork_stack(self, pairs) -> tuple:
        """((module, strength), ...) for a call: the loaded hypernetworks at their strengths now,
        then the call's (path, strength) pairs, each file read once while it is unchanged (an LRU
        of ADDON_CACHE modules keyed by path, size and mtime). The same file twice in one call is
        two hypernetworks, each at its own strength."""
        from fastdiff.formats import FormatError

        with self._lock:
            stack = [(h, float(h.strength)) for h in self.hypernetworks]
            keys = []
            for path, _ in pairs:
                try:
                    fk = file_key(path)
                except OSError as e:
                    raise FormatError(f"{path}: no such file or directory ({e.strerror})") from None
                keys.append((fk, sum(k[0] == fk for k in keys)))
            for key, (path, s) in zip(keys, pairs):
                hn = self._call_hns.get(key)
                if hn is None:
                    hn = self._call_hns[key] = self._read_hypernetwork(path, s)
                self._call_hns.move_to_end(key)
                stack.append((hn, float(s)))
            while len(self._call_hns) > max(ADDON_CACHE, len(pairs)):
                self._call_hns.popitem(last=False)
        return tuple(stack)

    # ------------------------------------------------------------------ generation

    def __call__(self, prompt, **kwargs) -> GenerationResult:
        """Generate images: `submit(...)` and wait for the result. Arguments as `submit`."""
        handle = self.submit(prompt, **kwargs)
        try:
            return handle.result()
        except BaseException:
            handle.cancel()
            raise

    def submit(self, prompt, *, negative_prompt="", steps=20, guidance_scale=7.0,
               sampler="euler_ancestral", schedule="normal", seed=None, width=None,
               height=None, num_images=1, batch_size=None, hypernetworks=(), embeddings=(),
               clip_skip=1, init_image=None, strength=0.75, output_type="pil", callback=None,
               eta=1.0, s_noise=1.0, progress=False, latents=None, hypernetwork_dir=None) -> "GenerationHandle":
        """Start generating and return at once with a handle: `.result()` waits for the
        GenerationResult, `.cancel()` stops the call's images at their next step,
        `.progress()` counts steps. Image i of the call uses seed + i whatever the batching;
        `seed` None draws one (reported in the result's parameters). `hypernetworks`: paths or
        (path, strength) pairs for this call only; `embeddings`: embedding files to load
        first. `latents`: the initial noise [N, C, h, w] (unit variance) instead of the
        seeds'. `callback({i, x, sigma, denoised})` is called in the waiting thread after each
        step of each batch of `batch_size` images (default: max_batch). `hypernetwork_dir`: a
        folder; `<hypernet:NAME:MULTIPLIER>` in the prompt applies NAME from it (A1111's tag)."""
        if hypernetwork_dir is not None and not isinstance(prompt, Request):
            from fastdiff.prompts import hypernetwork_tags

            prompt, tagged = hypernetwork_tags(prompt, hypernetwork_dir)
            hypernetworks = [*hn_pairs(hypernetworks), *tagged]
        from fastdiff import request as R

        limits = R.LIMITS if self.limits is None else self.limits
        req = prompt if isinstance(prompt, Request) else check_request(
            prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
            sampler=sampler, schedule=schedule, seed=seed, width=width, height=height,
            num_images=num_images, batch_size=batch_size, hypernetworks=hypernetworks,
            clip_skip=clip_skip, init_image=init_image, strength=strength, output_type=output_type,
            embeddings=embeddings, limits=limits)
        call_embeddings = req.embeddings + (embedding_paths(embeddings) if isinstance(prompt, Request) else ())
        width = req.width or self.info.native_size
        height = req.height or self.info.native_size
        for name, v in (("width", width), ("height", height)):
            if v % self.vae_factor:
                raise ValueError(f"{name} {v} is not a multiple of this model's VAE factor {self.vae_factor}")
        total = len(req.prompts) * req.num_images
        check_size(width, height, total, limits)  # with the native size filled in
        shape = (self.latent_channels, height // self.vae_factor, width // self.vae_factor)
        if latents is not None and tuple(latents.shape) != (total, *shape):
            raise ValueError(f"latents must be {[total, *shape]}, got {list(latents.shape)}")
        init = init_tensor(req.init_image, width, height) if req.init_image is not None else None
        extra = self._call_embeddings(call_embeddings)
        stack = self._hypernetwork_stack(req.hypernetworks)
        cfg = Conditioning.uses_uncond(req.guidance_scale)
        sig = sampling.sigmas(req.schedule, req.steps, self.info.alphas_cumprod)
        if init is not None:  # the last steps of the full schedule, from the encoded image
            sig = sig[req.steps - img2img_steps(req.strength, req.steps):]
        sig = sig.tolist()

        # cond and uncond rows share a UNet call: both get the larger chunk count. Tokenising
        # happens here, outside the device lock.
        chunks = {}
        for p, q in zip(req.prompts, req.negs):
            chunks[p, q] = max(self._chunk_count(p, extra), self._chunk_count(q, extra) if cfg else 1)
        with self.engine.device_lock.shared(), torch.inference_mode():
            conds = []
            for p, q in zip(req.prompts, req.negs):
                k = chunks[p, q]
                conds.append((self._context(p, req.clip_skip, k, extra),
                              self._context(q, req.clip_skip, k, extra) if cfg else None))
            x0 = self.encode_images(init.to(self.device)) if init is not None else None  # [1, C, h, w]
            extra = self._inpainting_extra(shape)
            hn_text = ", ".join(f"{h.name}:{s:g}" for h, s in stack)
            model_hash = str(self.info.hash) if self.info.hash is not None else None

            handle = GenerationHandle(self, req, total, callback, progress_bar(total * (len(sig) - 1), progress))
            for j in range(total):
                pi = j // req.num_images
                seed = req.seed + j
                gen = torch.Generator("cpu").manual_seed(seed)
                noise = (latents[j] if latents is not None else torch.randn(shape, generator=gen))[None]
                x = noise.to(self.device, torch.float32) * sig[0]
                if x0 is not None:
                    x = x0 + x
                cond = Conditioning(conds[pi][0], conds[pi][1], req.guidance_scale, extra, stack)
                job = Job(cond, x, sig, req.sampler, noise=self._noise(gen, shape), eta=eta, s_noise=s_noise,
                          call=handle, on_step=handle._on_step, on_done=handle._on_done)
                job.index = j
                handle.jobs.append(job)
                handle.parameters.append(dict(
                    prompt=req.prompts[pi], negative_prompt=req.negs[pi], steps=req.steps, sampler=req.sampler,
                    schedule=req.schedule, guidance_scale=req.guidance_scale, seed=seed, width=width,
                    height=height, clip_skip=req.clip_skip, strength=req.strength if init is not None else None,
                    model_hash=model_hash, model_name=self.info.name, hypernetworks=hn_text, version=__version__))
        self.engine.submit(handle.jobs)
        return handle

    def _noise(self, gen, shape):
        """Fresh noise for one image from its own CPU generator: the same seed gives the same
        image at any batch size and on any device."""
        cuda = self.device.type == "cuda"

        def draw(sigma, sigma_next):
            n = torch.randn(shape, generator=gen)[None]
            # pinned + non_blocking: the copy queues behind the running step instead of
            # waiting for it (a pageable copy would synchronise the loop every step)
            return n.pin_memory().to(self.device, non_blocking=True) if cuda else n

        return draw

    def _inpainting_extra(self, shape):
        """An inpainting UNet with no mask given: everything is to be painted (mask 1; the
        masked image is mid-grey), as A1111 conditions txt2img on inpainting checkpoints."""
        if self.unet.config.in_channels != 2 * self.latent_channels + 1:
            return None
        grey = torch.zeros(1, 3, shape[1] * self.vae_factor, shape[2] * self.vae_factor, device=self.device)
        mask = torch.ones(1, 1, *shape[1:], device=self.device)
        return torch.cat([mask, self.encode_images(grey)], dim=1).to(self.dtype)  # [1, 1 + C, h, w]

    def warmup(self, shapes=((1, None, None),), *, guidance: bool = True, chunks: int = 1,
               hypernetworks=()) -> int:
        """Capture the CUDA graphs for `shapes` — (images, height, width) in pixels, None for
        the native size — ahead of the first call, so a service's first request is as fast as
        its last. `chunks`: prompt length in 75-token chunks. Returns the number of graphs
        held. A no-op (0) without CUDA graphs."""
        if self.graphs is None:
            return 0
        stack = self._hypernetwork_stack(list(hn_pairs(hypernetworks)))
        dim = self.text_encoder.config.hidden_size
        with torch.inference_mode():
            for images, height, width in shapes:
                h = (height or self.info.native_size) // self.vae_factor
                w = (width or self.info.native_size) // self.vae_factor
                self.graphs.get(self.unet, rows=images * (2 if guidance else 1),
                                input_shape=(self.unet.config.in_channels, h, w), context_shape=(77 * chunks, dim),
                                dtype=self.dtype, device=self.device, hypernetworks=[hn for hn, _ in stack])
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


class GenerationHandle:
    """A running call: `result()` waits for it, `cancel()` stops it, `progress()` counts its
    image-steps. Callbacks and the progress bar run in the thread that waits in result()."""

    def __init__(self, pipe: Pipeline, req: Request, total: int, callback, bar):
        self.pipe = pipe
        self.request = req
        self.jobs: list[Job] = []
        self.parameters: list[dict] = []
        self._callback = callback
        self._bar = bar
        self._events: queue.Queue = queue.Queue()
        self._chunk = req.batch_size or min(total, pipe.engine.max_batch)
        self._steps: dict = {}  # (chunk, step) -> {image: (x, sigma, denoised)}
        self._result = None
        self._pending = total  # jobs not yet finished, as seen by the waiting thread

    def _on_step(self, job, d) -> None:  # in the job's thread: hand over to the waiting thread
        if self._callback is not None or self._bar is not None:
            self._events.put((job.index, d))

    def _on_done(self, job) -> None:
        self._events.put((job.index, None))

    def progress(self) -> dict:
        steps = sum(len(j.sigmas) - 1 for j in self.jobs)
        return {"images": len(self.jobs), "images_done": sum(j.done.is_set() for j in self.jobs),
                "steps": steps, "steps_done": sum(j.steps_done for j in self.jobs)}

    def done(self) -> bool:
        return all(j.done.is_set() for j in self.jobs)

    def cancel(self) -> None:
        """Stop every image of the call that has not finished (their slots free at the next
        evaluation); result() then raises Cancelled."""
        self.pipe.engine.cancel(self.jobs)

    def _dispatch(self, index, d) -> None:
        if self._bar is not None:
            self._bar.update(1)
        if self._callback is None:
            return
        c = index // self._chunk
        members = range(c * self._chunk, min((c + 1) * self._chunk, len(self.jobs)))
        got = self._steps.setdefault((c, d["i"]), {})
        got[index] = d
        if len(got) == len(members):
            del self._steps[c, d["i"]]
            ds = [got[m] for m in members]
            self._callback({"i": d["i"], "sigma": d["sigma"], "x": torch.cat([e["x"] for e in ds]),
                            "denoised": torch.cat([e["denoised"] for e in ds])})

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for every image, decode and return them. Raises Cancelled if the call was
        cancelled, or the first image's error (e.g. FloatingPointError for NaN output)."""
        if self._result is not None:
            return self._result
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self._pending:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    index, d = self._events.get(timeout=wait)
                except queue.Empty:
                    raise TimeoutError(f"generation not finished after {timeout} s") from None
                if d is None:
                    self._pending -= 1
                else:
                    self._dispatch(index, d)
        finally:
            if self._bar is not None and not self._pending:
                self._bar.close()
        errors = [j.error for j in self.jobs if j.error is not None]
        if errors:
            cancelled = [e for e in errors if isinstance(e, Cancelled)]
            raise (cancelled[0] if len(cancelled) == len(errors) else next(e for e in errors if not isinstance(e, Cancelled)))
        self._result = self._finish()
        return self._result

    def _finish(self) -> GenerationResult:
        pipe, req = self.pipe, self.request
        lat = [j.output for j in self.jobs]  # [1, C, h, w] each
        if req.output_type == "latent":
            images = torch.cat(lat)
        else:
            # One image at a time on the CPU (a decode's rounding depends on its batch there, so
            # an image is the same whatever else its call holds); in chunks on CUDA.
            step = 1 if pipe.device.type == "cpu" else self._chunk
            with pipe.engine.device_lock.shared():
                images = torch.cat([pipe.decode(torch.cat(lat[i:i + step])) for i in range(0, len(lat), step)])
        with pipe.engine.device_lock.shared():  # the copy to the host, too, stays out of captures
            images = convert(images, req.output_type)
        if req.output_type == "pil":  # as A1111's images: image.info["parameters"] is the infotext
            for img, p in zip(images, self.parameters):
                img.info["parameters"] = parameters_text(p)
        return GenerationResult(images, self.parameters, req.output_type)
