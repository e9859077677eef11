"""`fastdiff serve`: the A1111-compatible HTTP API in the foreground (uvicorn), or on Ray Serve
with --ray."""
from __future__ import annotations

import argparse
import logging
import os


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("serve", help="serve AUTOMATIC1111's HTTP API (/sdapi/v1/...) on the engine",
                              description="Serve AUTOMATIC1111's HTTP API on fastdiff's engine: concurrent requests "
                              "share UNet batches. OpenAPI docs at /docs; needs `pip install fastdiff[serve]`.")
    s.add_argument("--model", default=None, help="the model served at start (default: the model that ships with "
                   "fastdiff, with its hypernetwork and embedding)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 opens it to the network)")
    s.add_argument("--port", type=int, default=7861, help="port (default 7861)")
    s.add_argument("--models-dir", default=None, help="folder of models to switch between (sd_model_checkpoint)")
    s.add_argument("--hypernetwork-dir", default=None, help="folder of hypernetworks for <hypernet:NAME:W> in prompts")
    s.add_argument("--embeddings-dir", default=None, help="folder of textual-inversion embeddings, loaded at start")
    s.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    s.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    s.add_argument("--max-batch", type=int, default=None, help="images in one UNet call (default 8 CUDA, 4 CPU)")
    s.add_argument("--queue-limit", type=int, default=64, help="requests waiting or running at once; more get 503 "
                   "with Retry-After (default 64)")
    s.add_argument("--max-pixels", type=int, default=1024 * 1024, help="largest width x height (default 1048576)")
    s.add_argument("--max-steps", type=int, default=150, help="most sampling steps per request (default 150)")
    s.add_argument("--max-images", type=int, default=16, help="most images per request, batch_size x n_iter (default 16)")
    s.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS]",
                   help="HTTP basic auth for every endpoint but /health (as A1111's flag)")
    s.add_argument("--outdir", default="outputs", help="where save_images=true writes (default ./outputs)")
    s.add_argument("--workers", type=int, default=1, help="uvicorn worker processes, each with its own model (default 1)")
    s.add_argument("--ray", action="store_true", help="run on Ray Serve (needs `pip install fastdiff[ray]`)")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (one per GPU, or CPU workers)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=main)
    return s


def config_from(args):
    from fastdiff.serve.service import ServeConfig

    return ServeConfig(model=args.model, models_dir=args.models_dir, hypernetwork_dir=args.hypernetwork_dir,
                       embeddings_dir=args.embeddings_dir, device=args.device, dtype=args.dtype,
                       max_batch=args.max_batch, queue_limit=args.queue_limit, max_pixels=args.max_pixels,
                       max_steps=args.max_steps, max_images=args.max_images, api_auth=args.api_auth,
                       outdir=args.outdir)


def main(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"fastdiff serve needs the serve extra: pip install 'fastdiff[serve]' ({e})") from None
    config = config_from(args)
    from fastdiff.serve.service import credentials

    credentials(config.api_auth)  # a malformed --api-auth fails before the model loads
    if args.ray:
        from fastdiff.serve.ray import run

        return run(config, replicas=args.replicas, host=args.host, port=args.port)
    if args.workers > 1:
        # each worker builds its own Service (and model) from the config in the environment
        os.environ["FASTDIFF_SERVE_CONFIG"] = __import__("json").dumps(config.to_dict())
        uvicorn.run("fastdiff.serve.app:app_from_environment", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level=args.log_level, access_log=False)
        return 0
    from fastdiff.serve.app import create_app
    from fastdiff.serve.service import Service

    service = Service(config)
    service.warmup()  # before the port opens
    app = create_app(service=service)
    logging.getLogger("fastdiff.serve").info("serving %s on http://%s:%d (docs at /docs)", service.current.name,
                                              args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
