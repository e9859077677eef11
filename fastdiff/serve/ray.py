"""The same app on Ray Serve: one replica per GPU (or per CPU worker), Ray's HTTP proxy in
front, the same endpoints. Each replica is a process with its own Service and model; a
response's info names the replica that made it ("replica").

    import ray
    from ray import serve
    from fastdiff.serve import ServeConfig, ray_app

    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": 7861})
    serve.run(ray_app(ServeConfig(model="path/to/model"), replicas=2), route_prefix="/")

or `fastdiff serve --ray --replicas 2`. Needs `pip install fastdiff[ray]`.
"""
from __future__ import annotations

import logging
import time

from fastdiff.serve.service import ServeConfig

log = logging.getLogger("fastdiff.serve")


def ray_app(config: ServeConfig | None = None, *, replicas: int = 1, num_cpus: float | None = None,
            num_gpus: float | None = None):
    """A bound Ray Serve application of `replicas` fastdiff replicas. Default resources: one GPU
    per replica when the config's device is CUDA (or unset and Ray sees GPUs), else one CPU."""
    import ray
    from ray import serve

    config = config or ServeConfig()
    if num_gpus is None:
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        num_gpus = 1 if (config.device or ("cuda" if gpus else "cpu")).startswith("cuda") else 0
    options = {"num_cpus": 1 if num_cpus is None else num_cpus, "num_gpus": num_gpus}

    @serve.deployment(name="fastdiff", num_replicas=replicas, ray_actor_options=options,
                      max_ongoing_requests=config.queue_limit)
    @serve.ingress()
    class FastdiffReplica:
        def __init__(self, settings: dict):
            from fastdiff.serve.service import Service

            settings = {**settings, "replica_id": serve.get_replica_context().replica_tag}
            self.service = Service(ServeConfig(**settings))
            self.service.warmup()

        def __serve_build_asgi_app__(self):
            from fastdiff.serve.app import create_app

            return create_app(service=self.service)

    return FastdiffReplica.bind(config.to_dict())


def run(config: ServeConfig, *, replicas: int, host: str, port: int) -> int:
    """`fastdiff serve --ray`: start (or join, with RAY_ADDRESS) a Ray cluster, serve until ^C."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ValueError(f"fastdiff serve --ray needs the ray extra: pip install 'fastdiff[ray]' ({e})") from None
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    ray.init()
    serve.start(http_options={"host": host, "port": port})
    serve.run(ray_app(config, replicas=replicas), name="fastdiff", route_prefix="/")
    log.info("serving on Ray: http://%s:%d, %d replicas", host, port, replicas)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
