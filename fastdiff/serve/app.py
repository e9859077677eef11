"""The FastAPI app: AUTOMATIC1111's HTTP API (/sdapi/v1/...) on a Service, plus /health and
/metrics. `create_app(config)` builds one; `BackgroundServer` runs it with uvicorn in a thread
(tests, benchmarks); `fastdiff serve` (cli.py) runs it in the foreground.

A generation request: admitted (or 503 when --queue-limit requests are in flight), checked
(422 naming the field), submitted to the engine (it shares UNet batches with every other
request), then awaited in a worker thread while the event loop watches the connection: a
client that goes away cancels its images, which frees their engine slots at the next step.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from fastdiff.serve import names
from fastdiff.serve.schemas import (HypernetworkItem, ImageResponse, Img2ImgRequest, PngInfoRequest, PngInfoResponse,
                                    ProgressResponse, ProgressState, SamplerItem, SchedulerItem, SDModelItem,
                                    Txt2ImgRequest)
from fastdiff.serve.service import FieldError, QueueFull, ServeConfig, Service

log = logging.getLogger("fastdiff.serve")
POLL_S = 0.05  # how often a waiting request looks at its connection


class ClientGone(Exception):
    pass


def create_app(config: ServeConfig | None = None, *, service: Service | None = None) -> FastAPI:
    from fastdiff import __version__
    from fastdiff.engine import Cancelled
    from fastdiff.results import A1111_SAMPLER_NAMES, A1111_SCHEDULE_NAMES, parameters_text
    from fastdiff.serve.images import decode_image, encode_png, parse_infotext

    svc = service or Service(config)
    executor = ThreadPoolExecutor(max_workers=svc.config.queue_limit + 8, thread_name_prefix="fastdiff-serve")
    app = FastAPI(title="fastdiff", version=__version__,
                  description="AUTOMATIC1111-compatible API on fastdiff's engine (concurrent requests share UNet batches).")
    app.state.service = svc
    app.state.executor = executor
    basic = HTTPBasic(auto_error=False)

    def authorized(creds: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if not svc.credentials:
            return
        ok = False
        if creds is not None:
            user, password = creds.username.encode(), creds.password.encode()
            for u, p in svc.credentials:  # every pair compared, in constant time
                ok |= secrets.compare_digest(user, u.encode()) & secrets.compare_digest(password, p.encode())
        if not ok:
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    api = APIRouter(prefix="/sdapi/v1", dependencies=[Depends(authorized)])

    # ------------------------------------------------------------------ errors, log, metrics

    @app.exception_handler(FieldError)
    async def field_error(request: Request, e: FieldError):
        loc = ["body", *e.field.split(".")]
        return JSONResponse({"detail": [{"loc": loc, "msg": str(e), "type": "value_error"}],
                             "error": "ValidationError", "field": e.field}, status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return JSONResponse({"detail": f"server busy: {e}; retry later", "error": "QueueFull"}, status_code=503,
                            headers={"Retry-After": "1"})

    async def log_and_count(scope, receive, send, inner):
        # A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide a client's
        # disconnect from request.is_disconnected().
        if scope["type"] != "http":
            return await inner(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await inner(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "other")
            svc.metrics.requests.labels(path, str(status[0])).inc()
            log.info("%s %s %d %.3f s", scope["method"], scope["path"], status[0], time.perf_counter() - t0)

    app.add_middleware(_Wrap, around=log_and_count)

    # ------------------------------------------------------------------ generation

    async def wait(handle, request: Request):
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(executor, handle.result)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=POLL_S)
            if done:
                return fut.result()
            if await request.is_disconnected():
                handle.cancel()
                svc.metrics.cancelled.labels("client gone").inc()
                try:
                    await fut
                except BaseException:
                    pass
                raise ClientGone

    def info_of(model, result, body, kind, job) -> dict:
        ps = result.parameters
        p0 = ps[0]
        hn = p0.get("hypernetworks") or None
        return {
            "prompt": p0["prompt"], "all_prompts": [p["prompt"] for p in ps],
            "negative_prompt": p0["negative_prompt"], "all_negative_prompts": [p["negative_prompt"] for p in ps],
            "seed": p0["seed"], "all_seeds": [p["seed"] for p in ps],
            "subseed": body.subseed, "all_subseeds": [body.subseed] * len(ps), "subseed_strength": 0,
            "width": p0["width"], "height": p0["height"],
            "sampler_name": A1111_SAMPLER_NAMES.get(p0["sampler"], p0["sampler"]),
            "scheduler": A1111_SCHEDULE_NAMES.get(p0["schedule"], p0["schedule"]),
            "cfg_scale": p0["guidance_scale"], "steps": p0["steps"], "batch_size": body.batch_size,
            "n_iter": body.n_iter, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": model.name, "sd_model_hash": p0.get("model_hash"), "sd_vae_name": None,
            "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": p0.get("strength"),
            "extra_generation_params": {k: v for k, v in (("Schedule type", A1111_SCHEDULE_NAMES.get(p0["schedule"])),
                                                          ("Hypernetworks", hn)) if v},
            "index_of_first_image": 0, "infotexts": [parameters_text(p) for p in ps], "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(time.time())),
            "clip_skip": p0["clip_skip"], "is_using_inpainting_conditioning": False,
            "version": f"fastdiff {__version__}", "replica": svc.config.replica_id, "interrupted": job.interrupted,
        }

    def respond(model, result, body, kind, job) -> dict:
        images = []
        if body.send_images:
            images = [encode_png(img, img.info.get("parameters")) for img in result.images]
            if getattr(body, "include_init_images", False):
                images += list(body.init_images[:1])
        if body.save_images:
            result.save(os.path.join(svc.config.outdir, f"{kind}-images"))
        params = body.model_dump()
        for k in ("init_images", "mask"):
            if k in params:
                params[k] = None
        info = info_of(model, result, body, kind, job)
        svc.metrics.images.inc(len(result.images))
        return {"images": images, "parameters": params, "info": json.dumps(info)}

    async def generate(kind: str, body, request: Request):
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        with svc.admit(kind) as job:
            model, req, options = await loop.run_in_executor(executor, svc.prepare, body, kind)
            handle = await loop.run_in_executor(executor, svc.submit, model, req, options)
            job.handle = handle
            if job.interrupted:
                handle.cancel()
            try:
                result = await wait(handle, request)
            except ClientGone:
                return Response(status_code=499)
            except Cancelled:  # POST /interrupt
                svc.metrics.cancelled.labels("interrupted").inc()
                return {"images": [], "parameters": body.model_dump(exclude={"init_images", "mask"}),
                        "info": json.dumps({"interrupted": True, "replica": svc.config.replica_id})}
            except FloatingPointError as e:
                raise HTTPException(500, f"generation failed: {e}") from None
            out = await loop.run_in_executor(executor, respond, model, result, body, kind, job)
            svc.metrics.latency.labels(kind).observe(time.perf_counter() - t0)
            return out

    @api.post("/txt2img", response_model=ImageResponse)
    async def txt2img(request: Request, body: Txt2ImgRequest):
        return await generate("txt2img", body, request)

    @api.post("/img2img", response_model=ImageResponse)
    async def img2img(request: Request, body: Img2ImgRequest):
        return await generate("img2img", body, request)

    # ------------------------------------------------------------------ state and lists

    @api.get("/progress", response_model=ProgressResponse)
    def progress():
        with svc._lock:
            jobs = sorted(svc.inflight.values(), key=lambda j: j.id)
        steps = done = 0
        first = None
        for j in jobs:
            if j.handle is not None:
                p = j.handle.progress()
                steps, done = steps + p["steps"], done + p["steps_done"]
                first = first or p
        frac = done / steps if steps else 0.0
        elapsed = time.monotonic() - jobs[0].started if jobs else 0.0
        per_image = max(1, first["images"]) if first else 1
        state = ProgressState(
            interrupted=any(j.interrupted for j in jobs), job=jobs[0].kind if jobs else "", job_count=len(jobs),
            job_timestamp=time.strftime("%Y%m%d%H%M%S"), sampling_step=first["steps_done"] // per_image if first else 0,
            sampling_steps=first["steps"] // per_image if first else 0)
        return ProgressResponse(progress=frac, eta_relative=(elapsed / frac - elapsed) if frac > 0 else 0.0, state=state)

    @api.post("/interrupt")
    def interrupt():
        svc.interrupt()
        return {}

    @api.post("/skip")
    def skip():
        svc.interrupt()
        return {}

    @api.get("/samplers", response_model=list[SamplerItem])
    def samplers():
        aliases = {v: [k] for k, v in names._ALIASES.items() if v}
        return [SamplerItem(name=A1111_SAMPLER_NAMES.get(s, s), aliases=[*aliases.get(s, []), s])
                for s in names.sampling.SAMPLERS]

    @api.get("/schedulers", response_model=list[SchedulerItem])
    def schedulers():
        return [SchedulerItem(name=s, label=A1111_SCHEDULE_NAMES.get(s, s)) for s in names.sampling.SCHEDULES]

    @api.get("/sd-models", response_model=list[SDModelItem])
    def sd_models():
        with svc._lock:
            loaded = dict(svc._loaded)
        out = []
        for name, path in svc.models().items():
            m = loaded.get(name)
            h = str(m.pipe.info.hash) or None if m is not None else None
            out.append(SDModelItem(title=f"{name} [{h}]" if h else name, model_name=os.path.splitext(name)[0],
                                   hash=h, filename=path))
        return out

    @api.post("/refresh-checkpoints")
    def refresh_checkpoints():
        return {}

    @api.get("/hypernetworks", response_model=list[HypernetworkItem])
    def hypernetworks():
        return [HypernetworkItem(name=n, path=p) for n, p in svc.hypernetworks.items()]

    @api.get("/embeddings")
    def embeddings():
        m = svc.current
        loaded = {}
        for name in m.embeddings:
            v = m.pipe.embeddings.get(name)
            loaded[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                            "shape": int(v.shape[-1]) if v is not None else None,
                            "vectors": int(v.shape[0]) if v is not None else None}
        skipped = {n: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
                   for n in m.skipped if n not in svc.hypernetworks}
        return {"loaded": loaded, "skipped": skipped}

    @api.get("/options")
    def get_options():
        m = svc.current
        return {**svc.options, "sd_model_checkpoint": svc.model_title(m), "sd_checkpoint_hash": str(m.pipe.info.hash)}

    @api.post("/options")
    async def set_options(body: dict = Body(...)):
        for key, value in body.items():
            if key == "sd_model_checkpoint":
                await asyncio.get_running_loop().run_in_executor(executor, svc.set_model, value)
            elif key == "CLIP_stop_at_last_layers":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise FieldError(key, f"{key} must be an integer >= 1, got {value!r}")
                svc.options[key] = value
            elif key in ("eta_ancestral", "s_noise"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise FieldError(key, f"{key} must be a number, got {value!r}")
                svc.options[key] = float(value)
            elif key not in svc.options or svc.options[key] != value:
                raise FieldError(key, f"option {key} is not supported; settable: sd_model_checkpoint, "
                                      "CLIP_stop_at_last_layers, eta_ancestral, s_noise")
        return None

    @api.post("/png-info", response_model=PngInfoResponse)
    def png_info(body: PngInfoRequest):
        try:
            image = decode_image(body.image, "image")
        except ValueError as e:
            raise FieldError("image", str(e)) from None
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        text = items.pop("parameters", "")
        return PngInfoResponse(info=text, items=items, parameters=parse_infotext(text) if text else {})

    # ------------------------------------------------------------------ service endpoints

    @app.get("/health")
    def health():
        return {"status": "ok", "model": svc.current.name, "requests_in_flight": len(svc.inflight),
                **svc.engine_stats(), "replica": svc.config.replica_id}

    @app.get("/metrics", dependencies=[Depends(authorized)])
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(svc.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api)
    return app


class _Wrap:
    def __init__(self, app, around):
        self.app, self.around = app, around

    async def __call__(self, scope, receive, send):
        await self.around(scope, receive, send, self.app)


class BackgroundServer:
    """uvicorn serving `app` from a thread, on a port it binds first (0: a free one)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="fastdiff-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def app_from_environment() -> FastAPI:
    """The app of one uvicorn worker (`fastdiff serve --workers N`): its config comes from
    FASTDIFF_SERVE_CONFIG, a JSON ServeConfig."""
    service = Service(ServeConfig(**json.loads(os.environ["FASTDIFF_SERVE_CONFIG"])))
    service.warmup()
    return create_app(service=service)
