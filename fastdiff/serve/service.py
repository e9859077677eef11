"""What the HTTP API stands on: the loaded models, the add-on folders, the requests in flight
and the metrics. One Service per process (per Ray replica); the app (app.py) only translates
between HTTP and this.

Every check of a request happens in `prepare`, before any model work: A1111 fields fastdiff
cannot honour, names (sampler, scheduler, model, hypernetwork), the server's limits, images,
then fastdiff's own `check_request`. Each failure is a FieldError naming the A1111 field.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastdiff.serve import names

log = logging.getLogger("fastdiff.serve")

MODEL_FILE_EXTENSIONS = (".safetensors", ".ckpt")
ADDON_EXTENSIONS = (".pt", ".safetensors", ".bin", ".ckpt")


class FieldError(ValueError):
    """A bad request field, answered 422 naming it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


class QueueFull(Exception):
    """More requests than --queue-limit are waiting or running: answered 503 + Retry-After."""


# fastdiff's argument names (as its ValueErrors start) -> the A1111 field a client sent
_ARGUMENT_FIELDS = (
    ("prompt", "prompt"), ("negative", "negative_prompt"), ("unknown sampler", "sampler_name"),
    ("unknown schedule", "scheduler"), ("steps", "steps"), ("width", "width"), ("height", "height"),
    ("num_images", "n_iter"), ("batch_size", "batch_size"), ("clip_skip", "override_settings.CLIP_stop_at_last_layers"),
    ("guidance_scale", "cfg_scale"), ("seed", "seed"), ("hypernetwork", "prompt"), ("strength", "denoising_strength"),
    ("init image", "init_images"), ("init_image", "init_images"),
)


def field_of(message: str) -> str:
    for start, name in _ARGUMENT_FIELDS:
        if message.startswith(start):
            return name
    return "body"


@dataclass
class ServeConfig:
    """`fastdiff serve`'s options. No model: the model that ships with fastdiff, with its
    hypernetwork and embedding (they lie in its folder) listed."""

    model: str | None = None
    models_dir: str | None = None
    hypernetwork_dir: str | None = None
    embeddings_dir: str | None = None
    device: str | None = None
    dtype: str | None = None
    max_batch: int | None = None
    queue_limit: int = 64  # requests waiting or running at once; more get 503
    max_pixels: int = 1024 * 1024  # width * height of one image
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter of one request
    api_auth: str | None = None  # "user:pass[,user:pass]"
    outdir: str = "outputs"  # where save_images=true writes
    replica_id: str | None = None  # set by the Ray deployment, reported in each response's info
    max_loaded_models: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


def credentials(spec: str | None) -> list[tuple[str, str]]:
    """'user:pass,user2:pass2' -> [(user, pass), ...] (A1111's --api-auth)."""
    if not spec:
        return []
    out = []
    for item in spec.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user:
            raise ValueError(f"--api-auth: {item!r} is not USER:PASS")
        out.append((user, password))
    return out


@dataclass
class Inflight:
    id: int
    kind: str  # "txt2img" | "img2img"
    started: float
    handle: object = None
    interrupted: bool = False


@dataclass
class LoadedModel:
    name: str
    pipe: object
    embeddings: dict = field(default_factory=dict)  # name -> [n, dim] shape
    skipped: dict = field(default_factory=dict)  # file -> why


class Metrics:
    """Prometheus metrics in a registry of this service's own (GET /metrics)."""

    def __init__(self, service: "Service"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("fastdiff_http_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.images = Counter("fastdiff_images", "images generated and sent", registry=r)
        self.latency = Histogram("fastdiff_generation_seconds", "txt2img/img2img request latency", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300), registry=r)
        self.batch = Histogram("fastdiff_unet_batch_images", "images in one UNet call (engine batches)",
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.rejected = Counter("fastdiff_rejected", "requests refused because the queue was full (503)", registry=r)
        self.cancelled = Counter("fastdiff_cancelled", "requests stopped before they finished", ["reason"], registry=r)
        Gauge("fastdiff_queue_depth", "images waiting for an engine slot", registry=r).set_function(
            lambda: service.engine_stats()["queued"])
        Gauge("fastdiff_active_images", "images being sampled", registry=r).set_function(
            lambda: service.engine_stats()["active"])
        Gauge("fastdiff_requests_in_flight", "generation requests admitted and not answered", registry=r).set_function(
            lambda: len(service.inflight))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Service:
    def __init__(self, config: ServeConfig | None = None):
        from fastdiff.loader import DEFAULT_MODEL

        self.config = c = config or ServeConfig()
        if c.queue_limit < 1 or c.max_pixels < 64 or c.max_steps < 1 or c.max_images < 1:
            raise ValueError("queue_limit, max_steps and max_images must be >= 1 and max_pixels >= 64")
        from fastdiff.request import LIMITS

        # one set of limits: check_request and each loaded pipeline apply them
        self.limits = LIMITS.with_(max_steps=c.max_steps, max_pixels=c.max_pixels, max_images=c.max_images)
        self.credentials = credentials(c.api_auth)
        shipped = c.model is None
        self.hypernetwork_dir = c.hypernetwork_dir or (str(DEFAULT_MODEL) if shipped else None)
        self.embeddings_dir = c.embeddings_dir or (str(DEFAULT_MODEL) if shipped else None)
        for what, d in (("models dir", c.models_dir), ("hypernetwork dir", self.hypernetwork_dir),
                        ("embeddings dir", self.embeddings_dir)):
            if d is not None and not os.path.isdir(d):
                raise FileNotFoundError(f"{what} {d} is not a folder")
        self.metrics = Metrics(self)
        self.inflight: dict[int, Inflight] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self.options = {"CLIP_stop_at_last_layers": 1, "eta_ancestral": 1.0, "s_noise": 1.0,
                        "sd_hypernetwork": "None", "samples_format": "png", "outdir_samples": c.outdir}
        self.started = time.time()
        start = os.fspath(c.model) if c.model is not None else str(DEFAULT_MODEL)
        self._start_model = (self._model_name(start), start)
        self.embedding_files = self._scan(self.embeddings_dir)
        self.current = self._load(self._start_model[0])
        # a hypernetwork folder may be the model's own folder (the shipped model's is): files
        # that loaded as embeddings are not hypernetworks
        taken = set(self.current.embeddings.values()) if self.hypernetwork_dir == self.embeddings_dir else set()
        self.hypernetworks = {n: p for n, p in self._scan(self.hypernetwork_dir).items() if p not in taken}

    # ------------------------------------------------------------------ folders and models

    @staticmethod
    def _model_name(path: str) -> str:
        p = Path(path)
        return p.name

    @staticmethod
    def _scan(directory) -> dict:
        """name (file name without extension) -> path, for the add-on files directly in a folder."""
        if directory is None:
            return {}
        out = {}
        for e in sorted(os.scandir(directory), key=lambda e: e.name):
            stem, ext = os.path.splitext(e.name)
            if e.is_file() and ext.lower() in ADDON_EXTENSIONS:
                out.setdefault(stem, e.path)
        return out

    def models(self) -> dict:
        """name -> path: the start model, then each model in --models-dir (a diffusers folder,
        or a .safetensors/.ckpt file)."""
        out = {self._start_model[0]: self._start_model[1]}
        d = self.config.models_dir
        if d is not None:
            for e in sorted(os.scandir(d), key=lambda e: e.name):
                if (e.is_dir() and os.path.isfile(os.path.join(e.path, "model_index.json"))) or \
                        (e.is_file() and e.name.lower().endswith(MODEL_FILE_EXTENSIONS)):
                    out.setdefault(e.name, e.path)
        return out

    def resolve_model(self, title: str, field_name: str) -> str:
        """A1111's sd_model_checkpoint (a title 'name [hash]', a file name or a model name) ->
        our model name. Only names listed in the models folder resolve: no paths."""
        if not isinstance(title, str) or not title.strip():
            raise FieldError(field_name, f"{field_name} must be a model name; see GET /sdapi/v1/sd-models")
        name = title.strip()
        if name.endswith("]") and " [" in name:
            name = name[: name.rindex(" [")]
        if "/" in name or "\\" in name or name in (".", "..") or os.path.isabs(name):
            raise FieldError(field_name, f"{field_name} {title!r} is refused: give a model's name, not a path")
        models = self.models()
        for candidate in models:
            if name in (candidate, os.path.splitext(candidate)[0]):
                return candidate
        raise FieldError(field_name, f"unknown model {title!r}; available: {', '.join(models)}")

    def _load(self, name: str) -> LoadedModel:
        """The loaded model of that name, loading it (and this service's embeddings into it) if
        needed; at most max_loaded_models stay loaded (requests running on an evicted one finish)."""
        with self._load_lock:
            with self._lock:
                if name in self._loaded:
                    self._loaded.move_to_end(name)
                    return self._loaded[name]
            import fastdiff

            c = self.config
            t0 = time.perf_counter()
            pipe = fastdiff.load(self.models()[name], device=c.device, dtype=c.dtype, max_batch=c.max_batch,
                                 limits=self.limits)
            self._observe_batches(pipe)
            m = LoadedModel(name, pipe)
            for stem, path in self.embedding_files.items():
                try:
                    m.embeddings[pipe.load_embedding(path)] = path
                except Exception as e:  # a file of another width, or not an embedding at all
                    m.skipped[stem] = str(e)
            log.info("loaded model %s in %.1f s (%d embeddings)", name, time.perf_counter() - t0, len(m.embeddings))
            with self._lock:
                self._loaded[name] = m
                while len(self._loaded) > max(1, c.max_loaded_models):
                    old = next(iter(self._loaded))
                    if old == getattr(getattr(self, "current", None), "name", None):
                        self._loaded.move_to_end(old)
                        old = next(iter(self._loaded))
                    del self._loaded[old]
            return m

    def _observe_batches(self, pipe) -> None:
        pipe.engine.on_batch.append(self.metrics.batch.observe)

    def set_model(self, title: str) -> None:
        self.current = self._load(self.resolve_model(title, "sd_model_checkpoint"))

    def model_title(self, m: LoadedModel) -> str:
        h = str(m.pipe.info.hash) if m.pipe.info.hash is not None else ""
        return f"{m.name} [{h}]" if h else m.name

    def engine_stats(self) -> dict:
        with self._lock:
            loaded = list(self._loaded.values())
        stats = [m.pipe.engine.stats() for m in loaded]
        return {k: sum(s[k] for s in stats) for k in ("queued", "active")}

    def warmup(self) -> None:
        """One small generation (and the CUDA graphs of a one-image batch) before the port
        opens, so the first client does not pay for kernel compilation."""
        pipe = self.current.pipe
        t0 = time.perf_counter()
        pipe.warmup()
        pipe("warm-up", steps=2, seed=0, output_type="latent")
        log.info("warm-up done in %.1f s", time.perf_counter() - t0)

    # ------------------------------------------------------------------ requests

    @contextmanager
    def admit(self, kind: str):
        """A slot for one generation request, or QueueFull."""
        with self._lock:
            if len(self.inflight) >= self.config.queue_limit:
                self.metrics.rejected.inc()
                raise QueueFull(f"{len(self.inflight)} requests in flight (--queue-limit {self.config.queue_limit})")
            job = Inflight(next(self._ids), kind, time.monotonic())
            self.inflight[job.id] = job
        try:
            yield job
        finally:
            with self._lock:
                self.inflight.pop(job.id, None)

    def interrupt(self) -> int:
        with self._lock:
            jobs = list(self.inflight.values())
        for j in jobs:
            j.interrupted = True
            if j.handle is not None:
                j.handle.cancel()
        return len(jobs)

    def prepare(self, body, kind: str) -> tuple:
        """A request body -> (LoadedModel, checked fastdiff Request, submit options, meta).
        Raises FieldError naming the first bad field."""
        from fastdiff.prompts import parse_extra_networks
        from fastdiff.request import check_request
        from fastdiff.serve.images import decode_image
        from fastdiff.serve.schemas import UNSUPPORTED

        for name, is_off in UNSUPPORTED.items():
            if hasattr(body, name) and not is_off(getattr(body, name)):
                raise FieldError(name, f"{name}={getattr(body, name)!r} is not supported by fastdiff; leave it at "
                                       "A1111's default")
        model = self.current
        clip_skip = self.options["CLIP_stop_at_last_layers"]
        for key, value in body.override_settings.items():
            if key == "sd_model_checkpoint":
                model = self._load(self.resolve_model(value, "override_settings.sd_model_checkpoint"))
            elif key == "CLIP_stop_at_last_layers":
                clip_skip = value
            elif key not in self.options or self.options[key] != value:
                raise FieldError(f"override_settings.{key}", f"override_settings.{key} is not supported; "
                                 "supported: sd_model_checkpoint, CLIP_stop_at_last_layers")
        try:
            sampler, implied = names.resolve_sampler(body.sampler_name or body.sampler_index)
        except ValueError as e:
            raise FieldError("sampler_name" if body.sampler_name else "sampler_index", str(e)) from None
        try:
            schedule = names.resolve_schedule(body.scheduler) if body.scheduler else (implied or "normal")
        except ValueError as e:
            raise FieldError("scheduler", str(e)) from None
        # the server's limits (--max-steps, --max-pixels, --max-images) are checked by check_request
        native = model.pipe.info.native_size
        w, h = body.width or native, body.height or native
        total = body.batch_size * body.n_iter
        prompt, hns = body.prompt, []
        if not body.disable_extra_networks:
            prompt, tags = parse_extra_networks(body.prompt)
            for tag, name, args in tags:
                if tag != "hypernet":
                    raise FieldError("prompt", f"prompt: <{tag}:...> extra networks are not supported (only <hypernet:...>)")
                if name not in self.hypernetworks:
                    raise FieldError("prompt", f"prompt: unknown hypernetwork {name!r}; available: "
                                               f"{', '.join(self.hypernetworks) or 'none'} (GET /sdapi/v1/hypernetworks)")
                try:
                    hns.append((self.hypernetworks[name], float(args[0]) if args and args[0] else 1.0))
                except ValueError:
                    raise FieldError("prompt", f"prompt: <hypernet:{name}:{args[0]}>: the multiplier is not a number") from None
        init = None
        if kind == "img2img":
            if not body.init_images:
                raise FieldError("init_images", "init_images must hold one base64 image")
            try:
                init = decode_image(body.init_images[0], "init_images[0]").convert("RGB")
            except ValueError as e:
                raise FieldError("init_images", str(e)) from None
        try:
            req = check_request(prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                                guidance_scale=body.cfg_scale, sampler=sampler, schedule=schedule,
                                seed=None if body.seed == -1 else body.seed, width=w, height=h,
                                num_images=total, batch_size=body.batch_size, hypernetworks=hns, clip_skip=clip_skip,
                                init_image=init, strength=body.denoising_strength if init is not None else 0.75,
                                limits=self.limits)
        except (ValueError, FileNotFoundError) as e:
            msg = str(e)
            if "(max_pixels)" in msg:
                raise FieldError("width" if body.width else "height", msg) from None
            raise FieldError("batch_size" if "(max_images)" in msg else field_of(msg), msg) from None
        eta = self.options["eta_ancestral"] if body.eta is None else body.eta
        return model, req, dict(eta=eta, s_noise=body.s_noise)

    def submit(self, model: LoadedModel, req, options: dict):
        """Start the request on the engine; ValueErrors only a loaded model can find (sizes
        not a multiple of its VAE factor, a hypernetwork of other widths) become FieldErrors."""
        try:
            return model.pipe.submit(req, **options)
        except ValueError as e:  # fastdiff.formats.FormatError (a bad hypernetwork file) is one
            raise FieldError(field_of(str(e)), str(e)) from None
