"""fastdiff serve: an AUTOMATIC1111-compatible HTTP API (/sdapi/v1/...) on the engine, and a
Ray Serve deployment of the same app. Needs the `serve` extra (`pip install fastdiff[serve]`);
Ray needs the `ray` extra.

    from fastdiff.serve import ServeConfig, create_app
    app = create_app(ServeConfig(model="path/to/model"))   # any ASGI server runs it
"""
from __future__ import annotations

__all__ = ["ServeConfig", "Service", "create_app", "BackgroundServer", "ray_app"]


def __getattr__(name):
    if name in ("ServeConfig", "Service"):
        from fastdiff.serve import service

        return getattr(service, name)
    if name in ("create_app", "BackgroundServer"):
        from fastdiff.serve import app

        return getattr(app, name)
    if name == "ray_app":
        from fastdiff.serve.ray import ray_app

        return ray_app
    raise AttributeError(f"module 'fastdiff.serve' has no attribute {name!r}")
