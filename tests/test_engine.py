"""The engine (fastdiff/engine.py): continuous batching of model evaluations across requests.

CPU, fp32, the tiny random SD 1.x model of conftest.py. The invariant under test: an image is
bitwise the same whether it ran alone, in a batch of its own call, or joined a running batch
mid-way, for every sampler, with other guidance scales, negative prompts and sizes in flight."""
import random
import threading
import time

import pytest
import torch

import fastdiff
from fastdiff import sampling
from fastdiff.engine import Cancelled

SIZE = dict(width=32, height=32)


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return fastdiff.load(tiny_sd_dir, device="cpu", dtype=torch.float32)


class BatchLog:
    """Records the image count of every UNet call the engine makes."""

    def __init__(self, pipe, monkeypatch):
        self.sizes = []
        real = pipe.engine.evaluate

        def evaluate(items):
            self.sizes.append(len(items))
            return real(items)

        monkeypatch.setattr(pipe.engine, "evaluate", evaluate)


def wait_for(pred, timeout=60.0):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.0005)


def latent(pipe, prompt, **kw):
    return pipe(prompt, output_type="latent", **{**SIZE, **kw}).images


def poisoned_equal(a, b):
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
    return torch.equal(a, b)


# Three requests in flight at once: A runs long; B joins A's running batch at a random step
# with another guidance scale and negative prompt; C has another size (its own group).
@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_joining_mid_way_equals_alone(pipe, monkeypatch, sampler):
    rng = random.Random(sampler)
    A = dict(prompt="a red circle", negative_prompt="blue", guidance_scale=7.0, seed=rng.randrange(10**6), steps=10)
    B = dict(prompt="a green (square:1.2)", negative_prompt="", guidance_scale=3.5, seed=rng.randrange(10**6), steps=5)
    C = dict(prompt="a cat", negative_prompt="dog", guidance_scale=1.0, seed=rng.randrange(10**6), steps=6,
             width=40, height=24)
    alone = {}
    for name, job in (("A", A), ("B", B), ("C", C)):
        job = dict(job)
        alone[name] = latent(pipe, job.pop("prompt"), sampler=sampler, **job)

    log = BatchLog(pipe, monkeypatch)
    join_at = rng.randrange(1, 5)  # B joins after A's step join_at
    a_job = dict(A)
    ha = pipe.submit(a_job.pop("prompt"), sampler=sampler, output_type="latent", **SIZE, **a_job)
    c_job = dict(C)
    hc = pipe.submit(c_job.pop("prompt"), sampler=sampler, output_type="latent", **c_job)
    wait_for(lambda: ha.progress()["steps_done"] >= join_at)
    b_job = dict(B)
    hb = pipe.submit(b_job.pop("prompt"), sampler=sampler, output_type="latent", **SIZE, **b_job)
    a, b, c = ha.result(timeout=120).images, hb.result(timeout=120).images, hc.result(timeout=120).images
    assert ha.progress()["steps_done"] == 10 and hb.progress()["steps_done"] == 5
    assert poisoned_equal(a, alone["A"]) and poisoned_equal(b, alone["B"]) and poisoned_equal(c, alone["C"])
    assert max(log.sizes) == 2, log.sizes  # B shared A's UNet calls (C never could: other size)
    assert not torch.equal(alone["A"], alone["B"])


def test_batch_of_one_call_equals_each_image_alone(pipe):
    prompts = ["a red circle", "a blue square", "a yellow triangle"]
    whole = pipe(prompts, negative_prompt="grey", steps=4, seed=5, num_images=2, output_type="latent",
                 sampler="dpmpp_2m", **SIZE)
    for i in range(6):
        alone = latent(pipe, prompts[i // 2], negative_prompt="grey", steps=4, seed=5 + i, sampler="dpmpp_2m")
        assert torch.equal(whole.images[i:i + 1], alone)
    # and decoded images too: the VAE decodes one image at a time on the CPU
    img = pipe(prompts[:1], steps=2, seed=8, num_images=3, output_type="np", **SIZE).images
    for i in range(3):
        assert (img[i] == pipe(prompts[0], steps=2, seed=8 + i, output_type="np", **SIZE).images[0]).all()


def test_sixteen_threads_get_their_solo_results(pipe, monkeypatch):
    rng = random.Random(16)
    samplers = list(sampling.SAMPLERS)
    jobs = []
    for i in range(16):
        jobs.append(dict(prompt=f"a {rng.choice(['red', 'blue', 'green'])} {rng.choice(['circle', 'cat'])} {i}",
                         negative_prompt=rng.choice(["", "grey", "blurry, dark"]),
                         guidance_scale=rng.choice([1.0, 3.0, 7.5]), seed=rng.randrange(10**6),
                         steps=rng.randrange(2, 6), sampler=samplers[i % len(samplers)],
                         num_images=rng.choice([1, 1, 2])))

    def run(job):
        job = dict(job)
        return latent(pipe, job.pop("prompt"), **job)

    solo = [run(j) for j in jobs]
    log = BatchLog(pipe, monkeypatch)
    results = [None] * len(jobs)
    errors = []
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        try:
            barrier.wait()
            results[i] = run(jobs[i])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for got, want in zip(results, solo):
        assert got is not None and torch.equal(got, want)
    assert max(log.sizes) > 1 and max(log.sizes) <= pipe.engine.max_batch  # calls shared UNet batches


def test_cancel_frees_the_slot_and_leaves_others_alone(pipe, monkeypatch):
    monkeypatch.setattr(pipe.engine, "max_batch", 1)
    other = latent(pipe, "a blue square", seed=2, steps=4)
    long = pipe.submit("a red circle", seed=1, steps=400, output_type="latent", **SIZE)
    waiting = pipe.submit("a blue square", seed=2, steps=4, output_type="latent", **SIZE)
    wait_for(lambda: long.progress()["steps_done"] >= 2)
    assert waiting.progress()["steps_done"] == 0  # max_batch 1: it waits for the slot
    long.cancel()
    assert torch.equal(waiting.result(timeout=60).images, other)  # the slot was freed
    with pytest.raises(Cancelled):
        long.result(timeout=60)
    assert long.progress()["steps_done"] < 400
    assert pipe.engine.stats() == {"queued": 0, "active": 0}


def test_cancel_before_start_and_engine_keeps_working(pipe, monkeypatch):
    monkeypatch.setattr(pipe.engine, "max_batch", 1)
    first = pipe.submit("a red circle", seed=1, steps=200, output_type="latent", **SIZE)
    queued = pipe.submit("a cat", seed=3, steps=3, output_type="latent", **SIZE)
    queued.cancel()
    first.cancel()
    for h in (first, queued):
        with pytest.raises(Cancelled):
            h.result(timeout=60)
    assert torch.equal(latent(pipe, "a cat", seed=3, steps=3), latent(pipe, "a cat", seed=3, steps=3))


def test_progress_is_reported_per_step(pipe):
    seen = []
    h = pipe.submit("a red circle", steps=5, seed=4, num_images=3, batch_size=3, output_type="latent",
                    callback=lambda d: seen.append((d["i"], h.progress()["steps_done"], d["x"].shape[0])), **SIZE)
    out = h.result(timeout=60).images
    assert [i for i, _, _ in seen] == [0, 1, 2, 3, 4]  # once per step, for the 3 images together
    assert all(n == 3 for _, _, n in seen)
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and done[-1] == 15 and all(d >= 3 * (i + 1) for i, d, _ in seen)
    assert h.progress() == {"images": 3, "images_done": 3, "steps": 15, "steps_done": 15}
    assert out.shape[0] == 3


def test_max_batch_caps_images_per_unet_call(tiny_sd_dir, monkeypatch):
    pipe = fastdiff.load(tiny_sd_dir, device="cpu", max_batch=3)
    assert pipe.engine.max_batch == 3
    log = BatchLog(pipe, monkeypatch)
    latent(pipe, "a cat", steps=2, seed=1, num_images=7)
    assert max(log.sizes) == 3 and sum(log.sizes) == 7 * 2
    with pytest.raises(ValueError, match="max_batch"):
        fastdiff.load(tiny_sd_dir, device="cpu", max_batch=0)


def test_default_max_batch_on_cpu(pipe):
    assert pipe.engine.max_batch == 4


@pytest.mark.parametrize("policy", ["static", "serial"])
def test_static_and_serial_policies_never_join_running_batches(pipe, monkeypatch, policy):
    log = BatchLog(pipe, monkeypatch)
    monkeypatch.setattr(pipe.engine, "policy", policy)
    want_a = latent(pipe, "a red circle", seed=1, steps=6, num_images=2)
    want_b = latent(pipe, "a blue square", seed=9, steps=3)
    log.sizes.clear()
    ha = pipe.submit("a red circle", seed=1, steps=6, num_images=2, output_type="latent", **SIZE)
    wait_for(lambda: ha.progress()["steps_done"] >= 2)
    hb = pipe.submit("a blue square", seed=9, steps=3, output_type="latent", **SIZE)
    assert torch.equal(ha.result(timeout=60).images, want_a) and torch.equal(hb.result(timeout=60).images, want_b)
    assert log.sizes == [2] * 6 + [1] * 3  # B waited for A's batch to end


def test_serial_runs_one_call_at_a_time(pipe, monkeypatch):
    log = BatchLog(pipe, monkeypatch)
    monkeypatch.setattr(pipe.engine, "policy", "serial")
    hs = [pipe.submit("a cat", seed=s, steps=2, output_type="latent", **SIZE) for s in (1, 2, 3)]
    for h in hs:
        h.result(timeout=60)
    assert log.sizes == [1] * 6
    with pytest.raises(ValueError, match="policy"):
        pipe.engine.policy = "fastest"


def test_a_failing_batch_fails_its_jobs_only(pipe, monkeypatch):
    real = pipe.engine.evaluate
    calls = []

    def flaky(items):
        calls.append(len(items))
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(items)

    monkeypatch.setattr(pipe.engine, "evaluate", flaky)
    with pytest.raises(RuntimeError, match="device lost"):
        latent(pipe, "a cat", seed=1, steps=3)
    monkeypatch.setattr(pipe.engine, "evaluate", real)
    assert torch.equal(latent(pipe, "a cat", seed=1, steps=3), latent(pipe, "a cat", seed=1, steps=3))


def test_nested_call_from_a_callback_does_not_deadlock(pipe):
    inner = []

    def cb(d):
        if d["i"] == 0 and not inner:
            inner.append(latent(pipe, "a dog", seed=2, steps=2))

    out = pipe("a cat", seed=1, steps=3, output_type="latent", callback=cb, **SIZE).images
    assert torch.equal(out, latent(pipe, "a cat", seed=1, steps=3))
    assert torch.equal(inner[0], latent(pipe, "a dog", seed=2, steps=2))
