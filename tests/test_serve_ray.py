"""fastdiff serve on Ray Serve (fastdiff/serve/ray.py): a local Ray instance with 2 CPU replicas
behind Ray's HTTP proxy. Requests are spread over both replicas and each image equals the
single-process pipeline's, bitwise (CPU fp32)."""
import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import fastdiff  # noqa: E402
from fastdiff.serve import ServeConfig, ray_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url():
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app(ServeConfig(device="cpu", dtype="float32", max_batch=4), replicas=2, num_cpus=1),
                  name="fastdiff", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow  # a local Ray cluster and two replicas take about a minute to start on 2 cores
def test_two_replicas_share_the_load_and_equal_the_pipeline(ray_url):
    bodies = [{"prompt": f"shape {i}", "seed": 50 + i, "steps": 4, "sampler_name": "Euler a"} for i in range(8)]
    results = [None] * len(bodies)

    def one(i):
        with httpx.Client(base_url=ray_url, timeout=120) as c:
            results[i] = c.post("/sdapi/v1/txt2img", json=bodies[i])

    end = time.monotonic() + 60  # the proxy may answer 503/404 until both replicas are up
    while httpx.get(ray_url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < end
        time.sleep(0.5)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None and r.status_code == 200 for r in results), [r and r.text for r in results]
    replicas = {json.loads(r.json()["info"])["replica"] for r in results}
    assert len(replicas) == 2 and None not in replicas
    from PIL import Image

    # A replica with one CPU runs torch on one thread (Ray sets OMP_NUM_THREADS); CPU fp32 is
    # bitwise reproducible at the same thread count, so the reference runs on one thread too.
    pipe = fastdiff.load(device="cpu", dtype=torch.float32)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = [pipe(b["prompt"], seed=b["seed"], steps=b["steps"], sampler="euler_ancestral").images[0] for b in bodies]
    finally:
        torch.set_num_threads(threads_before)
    for b, r, ref in zip(bodies, results, refs):
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert np.array_equal(np.asarray(got), np.asarray(ref)), b
