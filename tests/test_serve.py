"""fastdiff serve (fastdiff/serve/): the A1111 HTTP API, spoken to over real HTTP.

The server runs uvicorn on 127.0.0.1 with a free port, in this process (BackgroundServer) with
a model of its own; the references are a separately loaded pipeline, CPU fp32. An image served
over HTTP must equal, pixel for pixel, the pipeline's image for the same parameters."""
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import fastdiff  # noqa: E402
from fastdiff.loader import DEFAULT_MODEL  # noqa: E402
from fastdiff.serve import BackgroundServer, ServeConfig, create_app  # noqa: E402

HN = str(DEFAULT_MODEL / "shapes-outlined.pt")
MAX_STEPS = 100


@pytest.fixture(scope="module")
def pipe():
    return fastdiff.load(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_sd_dir):
    d = tmp_path_factory.mktemp("models")
    os.symlink(DEFAULT_MODEL, d / "shapes")
    os.symlink(tiny_sd_dir, d / "tiny")
    return d


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    config = ServeConfig(device="cpu", dtype="float32", max_batch=8, queue_limit=32, max_steps=MAX_STEPS,
                         max_pixels=128 * 128, max_images=8, models_dir=str(models_dir),
                         hypernetwork_dir=str(DEFAULT_MODEL), embeddings_dir=str(DEFAULT_MODEL),
                         outdir=str(tmp_path_factory.mktemp("out")))
    app = create_app(config)
    with BackgroundServer(app) as s:
        s.service = app.state.service
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def png_pixels(b64) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_text(b64) -> str:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).info["parameters"]


def b64_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def txt2img(client, **body):
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    return out, json.loads(out["info"])


def same_pixels(served: list, reference) -> bool:
    assert len(served) == len(reference) > 0
    return all(np.array_equal(png_pixels(s), np.asarray(ref)) for s, ref in zip(served, reference))


# ------------------------------------------------------------------------- generation


def test_txt2img_equals_pipe_with_a1111_shape(client, pipe):
    out, info = txt2img(client, prompt="a red circle", negative_prompt="blue", seed=1234, steps=6, cfg_scale=6.5,
                        sampler_name="DPM++ 2M Karras", batch_size=2, n_iter=2, width=64, height=64)
    assert set(out) == {"images", "parameters", "info"}
    assert out["parameters"]["prompt"] == "a red circle" and out["parameters"]["n_iter"] == 2
    ref = pipe("a red circle", negative_prompt="blue", seed=1234, steps=6, guidance_scale=6.5, sampler="dpmpp_2m",
               schedule="karras", num_images=4, width=64, height=64)
    assert same_pixels(out["images"], ref.images)
    assert not np.array_equal(png_pixels(out["images"][0]), png_pixels(out["images"][1]))  # seeds differ
    for key in ("prompt", "all_prompts", "negative_prompt", "seed", "all_seeds", "subseed", "width", "height",
                "sampler_name", "cfg_scale", "steps", "batch_size", "infotexts", "sd_model_name", "sd_model_hash",
                "clip_skip", "job_timestamp", "index_of_first_image", "version"):
        assert key in info, key
    assert info["all_seeds"] == [1234, 1235, 1236, 1237] and info["seed"] == 1234
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras" and info["cfg_scale"] == 6.5
    assert [png_text(b) for b in out["images"]] == info["infotexts"]
    assert info["infotexts"][0].startswith("a red circle\nNegative prompt: blue\nSteps: 6, Sampler: DPM++ 2M")


def test_random_seed_is_reported_and_reproduces(client):
    out, info = txt2img(client, prompt="a square", seed=-1, steps=3, sampler_index="Euler")
    assert 0 <= info["seed"] < 2**32
    again, _ = txt2img(client, prompt="a square", seed=info["seed"], steps=3, sampler_name="euler")
    assert png_pixels(again["images"][0]).tolist() == png_pixels(out["images"][0]).tolist()


def test_img2img_equals_pipe(client, pipe):
    init = pipe("a green triangle", seed=7, steps=4).images[0]
    r = client.post("/sdapi/v1/img2img", json={"prompt": "a blue triangle", "init_images": [b64_png(init)],
                                               "denoising_strength": 0.6, "seed": 9, "steps": 8,
                                               "sampler_name": "Euler a", "scheduler": "Exponential"})
    assert r.status_code == 200, r.text
    ref = pipe("a blue triangle", init_image=init, strength=0.6, seed=9, steps=8, sampler="euler_ancestral",
               schedule="exponential")
    assert same_pixels(r.json()["images"], ref.images)
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.6
    assert r.json()["parameters"]["init_images"] is None


def test_png_info_round_trip(client):
    out, info = txt2img(client, prompt="a (red:1.2) circle, small", seed=77, steps=3, scheduler="Karras",
                        override_settings={"CLIP_stop_at_last_layers": 2})
    r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + out["images"][0]})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["info"] == info["infotexts"][0]
    p = got["parameters"]
    assert p["Prompt"] == "a (red:1.2) circle, small" and p["Seed"] == "77" and p["Steps"] == "3"
    assert p["Sampler"] == "Euler" and p["Schedule type"] == "Karras" and p["Clip skip"] == "2"
    assert (p["Size-1"], p["Size-2"]) == ("64", "64") and p["Model"] == "shapes-model"


def test_hypernet_tag(client, pipe):
    out, info = txt2img(client, prompt="a red circle <hypernet:shapes-outlined:0.6>", seed=5, steps=5)
    # A1111's default sampler is Euler (sampler_index), fastdiff's Euler a
    with_hn = pipe("a red circle ", hypernetworks=[(HN, 0.6)], seed=5, steps=5, sampler="euler")
    without = pipe("a red circle ", seed=5, steps=5, sampler="euler")
    assert same_pixels(out["images"], with_hn.images)
    assert not np.array_equal(png_pixels(out["images"][0]), np.asarray(without.images[0]))
    assert info["extra_generation_params"]["Hypernetworks"] == "shapes-outlined:0.6"
    # the same tag through fastdiff.generate() with a hypernetwork folder
    gen = fastdiff.generate("a red circle <hypernet:shapes-outlined:0.6>", hypernetwork_dir=str(DEFAULT_MODEL),
                            seed=5, steps=5, sampler="euler", device="cpu", dtype=torch.float32)
    assert same_pixels(out["images"], gen.images)


def test_concurrent_clients_equal_their_solo_results(server, client, pipe):
    """16 clients at once: the engine batches them, each gets exactly its solo image."""
    samplers = ["Euler a", "DPM++ 2M", "Euler", "DDIM"]
    bodies = [dict(prompt=f"shape {i}", seed=100 + i, steps=5 + i % 3, sampler_name=samplers[i % 4],
                   cfg_scale=5.0 + i % 2) for i in range(16)]
    batches_before = len(server.service.current.pipe.engine.batches)
    results = [None] * 16

    def one(i):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            results[i] = c.post("/sdapi/v1/txt2img", json=bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None and r.status_code == 200 for r in results)
    names = {"Euler a": "euler_ancestral", "DPM++ 2M": "dpmpp_2m", "Euler": "euler", "DDIM": "ddim"}
    for b, r in zip(bodies, results):
        ref = pipe(b["prompt"], seed=b["seed"], steps=b["steps"], sampler=names[b["sampler_name"]],
                   guidance_scale=b["cfg_scale"])
        assert same_pixels(r.json()["images"], ref.images), b
    assert max(list(server.service.current.pipe.engine.batches)[batches_before:]) > 1  # they did share UNet calls


def test_failing_request_does_not_disturb_its_batch(server, client, pipe, tmp_path, monkeypatch):
    """A hypernetwork with huge (finite) weights overflows to inf/NaN: that request fails (500),
    the one beside it does not. (A cfg_scale that large is refused before any work.)"""
    data = torch.load(HN, weights_only=True)
    for key, pair in data.items():
        if isinstance(key, int):
            for sd in pair:
                for name in sd:
                    sd[name] = sd[name] * 1e30
    torch.save(data, tmp_path / "boom.pt")
    monkeypatch.setitem(server.service.hypernetworks, "boom", str(tmp_path / "boom.pt"))
    results = {}

    def one(name, body):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            results[name] = c.post("/sdapi/v1/txt2img", json=body)

    threads = [threading.Thread(target=one, args=("bad", dict(prompt="x <hypernet:boom>", seed=1, steps=6))),
               threading.Thread(target=one, args=("good", dict(prompt="a circle", seed=2, steps=6)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results["bad"].status_code == 500 and "NaN" in results["bad"].text
    assert results["good"].status_code == 200
    assert same_pixels(results["good"].json()["images"], pipe("a circle", seed=2, steps=6, sampler="euler").images)


def test_save_images_writes_png_files(server, client):
    out, info = txt2img(client, prompt="a dot", seed=31, steps=2, save_images=True, send_images=False)
    assert out["images"] == []
    folder = os.path.join(server.service.config.outdir, "txt2img-images")
    assert "31.png" in os.listdir(folder)


# ------------------------------------------------------------------------- lists, options, models


def test_lists(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC", "LCM"} <= {s["name"] for s in samplers}
    assert {"Automatic", "Karras", "Exponential", "SGM Uniform"} <= {s["label"] for s in client.get("/sdapi/v1/schedulers").json()}
    models = client.get("/sdapi/v1/sd-models").json()
    assert {"shapes-model", "shapes", "tiny"} <= {m["model_name"] for m in models}
    assert [h["name"] for h in client.get("/sdapi/v1/hypernetworks").json()] == ["shapes-outlined"]
    emb = client.get("/sdapi/v1/embeddings").json()
    assert emb["loaded"]["pink"]["vectors"] == 1 and emb["skipped"] == {}
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"].startswith("shapes-model [") and opts["CLIP_stop_at_last_layers"] == 1
    prog = client.get("/sdapi/v1/progress").json()
    assert set(prog) >= {"progress", "eta_relative", "state"} and prog["state"]["job_count"] == 0
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200 and "/sdapi/v1/txt2img" in client.get("/openapi.json").json()["paths"]


def test_model_switching(client, tiny_sd_dir):
    tiny = fastdiff.load(tiny_sd_dir, device="cpu", dtype=torch.float32)
    ref = tiny("a cat", seed=3, steps=3, width=32, height=32, sampler="euler")
    try:
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"})
        assert r.status_code == 200, r.text
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny")
        out, info = txt2img(client, prompt="a cat", seed=3, steps=3, width=32, height=32)
        assert info["sd_model_name"] == "tiny" and same_pixels(out["images"], ref.images)
    finally:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes-model"}).status_code == 200
    # one request on another model, the default unchanged
    out, info = txt2img(client, prompt="a cat", seed=3, steps=3, width=32, height=32,
                        override_settings={"sd_model_checkpoint": "tiny [abc]"})
    assert info["sd_model_name"] == "tiny" and same_pixels(out["images"], ref.images)
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("shapes-model")


# ------------------------------------------------------------------------- bad input: 422 before model work

BAD = [
    (dict(enable_hr=True), "enable_hr"),
    (dict(restore_faces=True), "restore_faces"),
    (dict(tiling=True), "tiling"),
    (dict(alwayson_scripts={"controlnet": {"args": []}}), "alwayson_scripts"),
    (dict(script_name="xyz"), "script_name"),
    (dict(subseed_strength=0.5), "subseed_strength"),
    (dict(sampler_name="Nope"), "sampler_name"),
    (dict(sampler_index="Nope"), "sampler_index"),
    (dict(scheduler="Nope"), "scheduler"),
    (dict(steps=0), "steps"),
    (dict(steps=MAX_STEPS + 1), "steps"),
    (dict(steps="many"), "steps"),
    (dict(width=60), "width"),
    (dict(width=256, height=256), "width"),
    (dict(batch_size=4, n_iter=3), "batch_size"),
    (dict(batch_size=0), "batch_size"),
    (dict(cfg_scale="x"), "cfg_scale"),
    (dict(seed=-5), "seed"),
    (dict(prompt="a <hypernet:nope:0.5>"), "prompt"),
    (dict(prompt="a <hypernet:../shapes-model/shapes-outlined>"), "prompt"),
    (dict(prompt="a <hypernet:shapes-outlined:x>"), "prompt"),
    (dict(prompt="a <lora:style:0.5>"), "prompt"),
    (dict(override_settings={"sd_vae": "other.vae"}), "sd_vae"),
    (dict(override_settings={"sd_model_checkpoint": "../tiny"}), "sd_model_checkpoint"),
    (dict(override_settings={"sd_model_checkpoint": "/etc/passwd"}), "sd_model_checkpoint"),
    (dict(override_settings={"sd_model_checkpoint": "unknown"}), "sd_model_checkpoint"),
    (dict(override_settings={"CLIP_stop_at_last_layers": 0}), "CLIP_stop_at_last_layers"),
]
BAD_IMG2IMG = [
    (dict(init_images=["not base64!"]), "init_images"),
    (dict(init_images=[base64.b64encode(b"plain text, not an image").decode()]), "init_images"),
    (dict(init_images=[]), "init_images"),
    (dict(denoising_strength=0), "denoising_strength"),
    (dict(mask="abc"), "mask"),
    (dict(resize_mode=2), "resize_mode"),
]


@pytest.mark.parametrize("endpoint,body,field", [("txt2img", b, f) for b, f in BAD] +
                         [("img2img", b, f) for b, f in BAD_IMG2IMG])
def test_bad_field_is_422_naming_it(server, client, pipe, endpoint, body, field):
    base = {"prompt": "a", "steps": 2}
    if endpoint == "img2img" and "init_images" not in body:
        base["init_images"] = [b64_png(pipe("x", steps=1, seed=0).images[0])]
    batches = len(server.service.current.pipe.engine.batches)
    r = client.post(f"/sdapi/v1/{endpoint}", json={**base, **body})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(field in d["loc"] for d in detail), detail
    assert len(server.service.current.pipe.engine.batches) == batches  # no model work was done


def test_a1111_defaults_of_unsupported_fields_are_accepted(client):
    body = dict(prompt="a", steps=2, seed=1, enable_hr=False, restore_faces=False, tiling=False, styles=[],
                subseed=-1, subseed_strength=0, seed_resize_from_h=-1, seed_resize_from_w=-1, alwayson_scripts={},
                script_args=[], script_name=None, s_churn=0.0, s_tmin=0.0, s_min_uncond=0.0, hr_scale=2.0,
                do_not_save_grid=True, some_future_field=1)
    txt2img(client, **body)


def test_options_refuse_unknown_keys(client):
    r = client.post("/sdapi/v1/options", json={"some_option": 3})
    assert r.status_code == 422 and "some_option" in r.text
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc"})
    assert r.status_code == 422 and "refused" in r.text


def test_png_info_bad_image_is_422(client):
    r = client.post("/sdapi/v1/png-info", json={"image": "@@@"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]


# ------------------------------------------------------------------------- load, faults, auth


def wait_for(pred, timeout=30.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_disconnecting_client_frees_its_slot(server, client):
    engine = server.service.current.pipe.engine
    calls = len(engine.batches)
    body = json.dumps({"prompt": "slow", "steps": MAX_STEPS, "batch_size": 2, "seed": 1}).encode()
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    wait_for(lambda: engine.stats()["active"] == 2 and len(engine.batches) > calls + 2)
    sock.close()
    wait_for(lambda: engine.stats() == {"queued": 0, "active": 0} and not server.service.inflight)
    assert len(engine.batches) - calls < MAX_STEPS // 2  # stopped early, not run to the end
    assert 'fastdiff_cancelled_total{reason="client gone"} 1.0' in client.get("/metrics").text


def test_metrics(client):
    txt2img(client, prompt="m", steps=2, seed=1, batch_size=2)
    text = client.get("/metrics").text
    for name in ("fastdiff_images_total", "fastdiff_unet_batch_images_bucket", "fastdiff_queue_depth",
                 "fastdiff_active_images", "fastdiff_requests_in_flight", 'fastdiff_generation_seconds_bucket{endpoint="txt2img"',
                 'fastdiff_http_requests_total{path="/sdapi/v1/txt2img",status="200"}'):
        assert name in text, name


@pytest.fixture(scope="module")
def small_server():
    """queue_limit 1 and basic auth with two users."""
    config = ServeConfig(device="cpu", dtype="float32", queue_limit=1, max_steps=MAX_STEPS,
                         api_auth="alice:s3cret,bob:pa:ss")
    app = create_app(config)
    with BackgroundServer(app) as s:
        s.service = app.state.service
        yield s


def test_auth(small_server):
    with httpx.Client(base_url=small_server.url, timeout=60) as c:
        r = c.get("/sdapi/v1/samplers")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
        assert c.get("/sdapi/v1/samplers", auth=("alice", "wrong")).status_code == 401
        assert c.get("/sdapi/v1/samplers", auth=("mallory", "s3cret")).status_code == 401
        assert c.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 1}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/sdapi/v1/samplers", auth=("alice", "s3cret")).status_code == 200
        assert c.get("/sdapi/v1/samplers", auth=("bob", "pa:ss")).status_code == 200
        assert c.get("/health").status_code == 200  # load balancers probe it without credentials


def test_queue_full_is_503_and_interrupt(small_server):
    auth = ("alice", "s3cret")
    first = {}

    def long_request():
        with httpx.Client(base_url=small_server.url, timeout=120, auth=auth) as c:
            first["r"] = c.post("/sdapi/v1/txt2img", json={"prompt": "long", "steps": MAX_STEPS, "seed": 1})

    t = threading.Thread(target=long_request)
    t.start()
    with httpx.Client(base_url=small_server.url, timeout=60, auth=auth) as c:
        wait_for(lambda: c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 2)
        prog = c.get("/sdapi/v1/progress").json()
        assert prog["state"]["job_count"] == 1 and 0 < prog["progress"] < 1 and prog["eta_relative"] > 0
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "second", "steps": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert c.post("/sdapi/v1/interrupt").status_code == 200
        t.join(timeout=60)
        assert first["r"].status_code == 200
        assert first["r"].json()["images"] == [] and json.loads(first["r"].json()["info"])["interrupted"]
        # the slot is free again
        assert c.post("/sdapi/v1/txt2img", json={"prompt": "third", "steps": 1}).status_code == 200
        assert "fastdiff_rejected_total 1.0" in c.get("/metrics").text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fastdiff_serve_command(tmp_path):
    """The real command: warms up, then opens 127.0.0.1:PORT; a request gets its image."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastdiff", "serve", "--port", str(port), "--device", "cpu",
                             "--max-steps", "10", "--log-level", "info", "--outdir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "fastdiff serve did not start"
            time.sleep(0.2)
        r = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 3, "seed": 4}, timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert httpx.post(url + "/sdapi/v1/txt2img", json={"steps": 11}, timeout=60).status_code == 422
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "warm-up done" in out and "POST /sdapi/v1/txt2img 200" in out
