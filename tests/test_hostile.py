"""Hostile files and arguments fail fast and small, with errors naming the file, key or argument,
and never change the next call.

Each reproduction asserts the error type and what the message names; times are bounded as a
ratio against a normal load or call (never an absolute time); the bomb cases bound the peak
memory (tracemalloc for Python objects, the process's peak RSS for tensors); and the same
pipeline gives the same image afterwards, bitwise (CPU fp32, the shipped model)."""
import json
import os
import resource
import shutil
import struct
import threading
import time
import tracemalloc
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from fastdiff import loader, request
from fastdiff.formats import FormatError, load_embedding, load_pickle, read_hypernetwork
from fastdiff.formats.files import TensorFile
from fastdiff.loader import DEFAULT_MODEL
from fastdiff.request import LIMITS, check_request

HN = str(DEFAULT_MODEL / "shapes-outlined.pt")
PINK = str(DEFAULT_MODEL / "pink.safetensors")
CALL = dict(prompt="a red circle", seed=1, steps=3, output_type="pt")
MB = 1 << 20


@pytest.fixture(scope="module")
def pipe():
    return fastdiff.load(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(pipe):
    return run(pipe)


def run(pipe, **kw):
    kw = {**CALL, **kw}
    return pipe(kw.pop("prompt"), **kw).images


def assert_unchanged(pipe, reference):
    """The next call is the call it was before: same image, bitwise; nothing left behind."""
    assert torch.equal(run(pipe), reference)
    assert not pipe.hypernetworks and not pipe.embeddings


def best_time(fn, repeat=3) -> float:
    """The fastest of `repeat` runs of fn (an expected exception counts as a run)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        try:
            fn()
        except (ValueError, FileNotFoundError):
            pass
        times.append(time.perf_counter() - t)
    return min(times)


@pytest.fixture(scope="module")
def call_time(pipe):
    """A normal call's time: the unit the refusals of bad arguments are measured in."""
    return best_time(lambda: run(pipe))


@pytest.fixture(scope="module")
def hn_load_time():
    from fastdiff.addons import load_hypernetwork

    return best_time(lambda: load_hypernetwork(HN), repeat=5)


def peak_growth(fn):
    """(Python peak bytes, growth of the process's peak RSS in bytes) while fn runs. The RSS
    peak only moves when fn goes past every earlier peak, so a growth bound is conservative."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        fn()
    finally:
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return py_peak, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024


def refuses(exc, match, fn):
    with pytest.raises(exc, match=match) as info:
        fn()
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)
    return info.value


# ------------------------------------------------------------------ 1. hypernetwork bombs

HN_BOMBS = {
    "claimed-width-20000": ({20000: [{}, {}], "layer_structure": [1, 2, 1]}, r"width 20000"),
    "width-1e6": ({10 ** 6: [{}, {}], "layer_structure": [1, 2, 1]}, r"width 1000000"),
    "layers-100000": ({768: [{}, {}], "layer_structure": [1, 100000, 1]}, r"layer_structure"),
    "layer-structure-5": ({768: [{}, {}], "layer_structure": 5}, r"layer_structure"),
    "layer-structure-negative": ({768: [{}, {}], "layer_structure": [1, -2, 1]}, r"layer_structure"),
    "activation-a-list": ({768: [{}, {}], "activation_func": ["relu"]}, r"activation"),
    "width-negative": ({-64: [{}, {}]}, r"width -64"),
    "flag-a-dict": ({768: [{}, {}], "is_layer_norm": {"x": 1}}, r"is_layer_norm"),
    "tensors-of-other-shape": ({64: [{"linear1.weight": torch.zeros(3, 3)}, {}]}, r"width 64"),
}


@pytest.mark.parametrize("name", list(HN_BOMBS))
def test_hypernetwork_bombs_fail_fast_and_small(pipe, reference, tmp_path, hn_load_time, name):
    data, match = HN_BOMBS[name]
    path = tmp_path / f"{name}.pt"
    torch.save(data, path)
    assert path.stat().st_size < 4096
    for load in (read_hypernetwork, pipe.load_hypernetwork,
                 lambda p: run(pipe, hypernetworks=[(p, 0.5)])):
        refuses(FormatError, rf"{name}\.pt: .*{match}", lambda: load(str(path)))
    assert best_time(lambda: pipe.load_hypernetwork(str(path))) <= 3 * hn_load_time
    py_peak, rss = peak_growth(lambda: pytest.raises(FormatError, pipe.load_hypernetwork, str(path)))
    assert py_peak < 1 * MB and rss < 64 * MB
    # `fastdiff info` on it: one line, exit 2
    from fastdiff.cli import main

    assert main(["info", str(path)]) == 2
    assert_unchanged(pipe, reference)


# ------------------------------------------------------------------ 2. bad embeddings

def test_embedding_of_76_vectors_is_refused_and_bricks_nothing(pipe, reference, tmp_path):
    path = tmp_path / "e.safetensors"
    save_file({"emb_params": torch.randn(76, 64)}, str(path))
    refuses(FormatError, r"e\.safetensors: .*76 vectors", lambda: pipe.load_embedding(str(path)))
    assert_unchanged(pipe, reference)
    refuses(FormatError, r"e\.safetensors", lambda: run(pipe, embeddings=[str(path)]))
    assert_unchanged(pipe, reference)


def test_embedding_of_wrong_width_or_nan_is_refused(pipe, reference, tmp_path):
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.randn(2, 768)}, str(wide))
    refuses(FormatError, r"width 768.* expects 64", lambda: pipe.load_embedding(str(wide)))
    nan = tmp_path / "nan.pt"
    vec = torch.randn(2, 64)
    vec[1, 3] = float("nan")
    torch.save({"string_to_param": {"*": vec}}, nan)
    refuses(FormatError, r"nan\.pt: tensor 'string_to_param' holds 1 NaN/inf", lambda: pipe.load_embedding(str(nan)))
    assert_unchanged(pipe, reference)


def test_huge_embedding_is_refused_from_its_header(tmp_path):
    """A 2 GB embedding (a sparse file: the header and a hole) is refused from the header's
    shape, reading no data: memory stays flat and it costs what a normal embedding does."""
    path = tmp_path / "huge.safetensors"
    n = 700_000
    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [n, 768], "data_offsets": [0, n * 768 * 4]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + n * 768 * 4)
    assert path.stat().st_size > 2e9
    normal = best_time(lambda: load_embedding(PINK), repeat=5)
    refuses(FormatError, rf"huge\.safetensors: .*{n} vectors", lambda: load_embedding(str(path)))
    assert best_time(lambda: load_embedding(str(path))) <= 3 * normal
    py_peak, rss = peak_growth(lambda: pytest.raises(FormatError, load_embedding, str(path)))
    assert py_peak < 1 * MB and rss < 64 * MB


def test_generate_with_a_bad_embedding_leaves_the_cached_model_working(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "_CACHE", {})
    kw = dict(device="cpu", dtype="float32", **CALL)
    first = fastdiff.generate(**kw).images
    path = tmp_path / "e.safetensors"
    save_file({"emb_params": torch.randn(76, 64)}, str(path))
    with pytest.raises(FormatError, match=r"e\.safetensors"):
        fastdiff.generate(embeddings=[str(path)], **kw)
    assert torch.equal(fastdiff.generate(**kw).images, first)


# ------------------------------------------------------------------ 3. size limits

SIZE_BOMBS = [
    (dict(width=100000), r"width must be at most 8192 \(max_side\), got 100000"),
    (dict(width=8192, height=8192), r"width x height must be at most \d+ pixels \(max_pixels\), got 8192x8192"),
    (dict(width=100000, height=100000), r"max_side"),
    (dict(steps=10 ** 9), r"steps must be at most 10000 \(max_steps\), got 1000000000"),
    (dict(num_images=10 ** 6), r"at most 10000 images .*\(max_images\), got 1000000"),
    (dict(num_images=2000, width=512, height=512), r"max_batch_pixels"),
    (dict(prompt="x" * MB), r"prompt is 1048576 characters; the limit is 20000 \(max_prompt_chars\)"),
    (dict(prompt=["a"] * 20000), r"max_images"),
]


@pytest.mark.parametrize("kw,match", SIZE_BOMBS, ids=[str(k)[:40] for k, _ in SIZE_BOMBS])
def test_size_limits_fail_in_a_fraction_of_a_call(pipe, reference, call_time, kw, match):
    spent = best_time(lambda: refuses(ValueError, match, lambda: run(pipe, **kw)))
    assert spent <= 0.2 * call_time
    py_peak, rss = peak_growth(lambda: pytest.raises(ValueError, run, pipe, **kw))
    assert py_peak < 4 * MB and rss < 64 * MB
    assert_unchanged(pipe, reference)


def test_native_size_from_config_is_limited(tmp_path, call_time):
    """A model whose config claims sample_size 10**6 loads, and its first call is refused."""
    d = tmp_path / "big-native"
    shutil.copytree(DEFAULT_MODEL, d, ignore=shutil.ignore_patterns("unet"))
    (d / "unet").mkdir()
    os.symlink(DEFAULT_MODEL / "unet" / "diffusion_pytorch_model.safetensors", d / "unet" / "diffusion_pytorch_model.safetensors")
    cfg = json.loads((DEFAULT_MODEL / "unet" / "config.json").read_text())
    (d / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": 10 ** 6}))
    big = fastdiff.load(str(d), device="cpu", dtype=torch.float32)
    assert best_time(lambda: refuses(ValueError, r"\((max_side|max_pixels)\)", lambda: run(big))) <= 0.2 * call_time


def test_limits_come_from_the_pipeline_or_the_module(pipe, monkeypatch):
    small = fastdiff.load(device="cpu", dtype=torch.float32, limits=LIMITS.with_(max_pixels=32 * 32, max_steps=2))
    refuses(ValueError, r"max_pixels", lambda: run(small, steps=2))  # the native 64x64
    refuses(ValueError, r"steps must be at most 2", lambda: run(small, width=32, height=32))
    assert run(small, width=32, height=32, steps=2).shape == (1, 3, 32, 32)
    monkeypatch.setattr(request, "LIMITS", LIMITS.with_(max_images=1))
    refuses(ValueError, r"max_images", lambda: run(pipe, num_images=2))
    refuses(ValueError, r"max_images", lambda: check_request("a", num_images=2))


# ------------------------------------------------------------------ 4. state between calls

def test_per_call_embedding_does_not_stay(pipe, reference):
    kw = dict(prompt="a pink circle")
    first = run(pipe, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'pink' is a vocabulary word: warned about below
        pinked = run(pipe, embeddings=[PINK], **kw)
    assert not torch.equal(first, pinked)
    assert torch.equal(run(pipe, **kw), first)
    assert_unchanged(pipe, reference)


def test_failing_model_load_keeps_the_cached_model(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "_CACHE", {})
    kw = dict(device="cpu", dtype="float32", **CALL)
    first = fastdiff.generate(**kw).images
    cached = list(loader._CACHE.values())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(FormatError, match=r"bad\.safetensors"):
        fastdiff.generate(model=str(bad), **kw)
    assert list(loader._CACHE.values()) == cached
    assert torch.equal(fastdiff.generate(**kw).images, first)


def test_callback_calling_the_pipeline_leaves_the_outer_call_alone(pipe, reference):
    kw = dict(hypernetworks=[(HN, 0.7)], batch_size=1)
    alone = run(pipe, **kw)
    inner = []

    def callback(d):
        if d["i"] == 0:
            inner.append(run(pipe, prompt="a blue square", seed=5))

    assert torch.equal(run(pipe, callback=callback, **kw), alone)
    assert inner and torch.equal(inner[0], run(pipe, prompt="a blue square", seed=5))
    assert_unchanged(pipe, reference)


def test_strength_change_during_a_call_waits_for_the_next(pipe, reference):
    hn = pipe.load_hypernetwork(HN, strength=0.5)
    try:
        at_half = run(pipe)

        def callback(d):  # runs in this (the waiting) thread while the engine's thread samples
            hn.strength = 1.0

        assert torch.equal(run(pipe, callback=callback), at_half)
        at_one = run(pipe)
        assert not torch.equal(at_one, at_half)
        # and from another thread, while the call runs
        hn.strength = 0.5
        handle = pipe.submit(CALL["prompt"], seed=1, steps=3, output_type="pt")
        t = threading.Thread(target=setattr, args=(hn, "strength", 1.0))
        t.start()
        t.join()
        assert torch.equal(handle.result().images, at_half)
    finally:
        pipe.unload_hypernetworks()
    assert_unchanged(pipe, reference)


# ------------------------------------------------------------------ 5. the per-call cache

def test_hypernetwork_cache_is_bounded_and_sees_replaced_files(pipe, reference, tmp_path):
    from fastdiff.pipeline import ADDON_CACHE

    for i in range(ADDON_CACHE + 6):
        shutil.copy(HN, tmp_path / f"h{i}.pt")
        run(pipe, hypernetworks=[(str(tmp_path / f"h{i}.pt"), 0.5)], steps=1)
    assert len(pipe._call_hns) <= ADDON_CACHE
    # a file replaced at the same path is read again
    path = tmp_path / "same.pt"
    shutil.copy(HN, path)
    old = run(pipe, hypernetworks=[(str(path), 1.0)])
    data = torch.load(HN, weights_only=True)
    for k, pair in data.items():
        if isinstance(k, int):
            for sd in pair:
                for name in sd:
                    sd[name] = -sd[name]
    torch.save(data, tmp_path / "other.pt")
    new = run(pipe, hypernetworks=[(str(tmp_path / "other.pt"), 1.0)])
    torch.save(data, path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert not torch.equal(old, new)
    assert torch.equal(run(pipe, hypernetworks=[(str(path), 1.0)]), new)
    assert_unchanged(pipe, reference)


# ------------------------------------------------------------------ 6. long prompts

def test_long_prompt_is_refused_before_tokenising(pipe, call_time, monkeypatch):
    from fastdiff import prompts

    monkeypatch.setattr(prompts, "tokenize", lambda *a, **k: pytest.fail("tokenised"))
    assert best_time(lambda: refuses(ValueError, r"max_prompt_chars", lambda: run(pipe, prompt="x " * MB))) \
        <= 0.2 * call_time
    refuses(ValueError, r"negative_prompt is .* characters", lambda: run(pipe, negative_prompt="y" * 30000))


def test_tokenising_holds_no_pipeline_lock(pipe, monkeypatch):
    """Tokenising never holds the add-on lock (which every submit takes), and the chunk counts
    are taken before the device lock: a long prompt holds up nobody else's call."""
    from fastdiff import prompts

    real = prompts.tokenize
    seen = []

    def spy(*a, **k):
        seen.append((pipe._lock._is_owned(), pipe.engine.device_lock._mine()))
        return real(*a, **k)

    monkeypatch.setattr(prompts, "tokenize", spy)
    run(pipe, prompt="a long prompt, " * 300)
    assert seen and not any(owned for owned, _ in seen)
    assert seen[0][1] == 0


# ------------------------------------------------------------------ 7. CLI: one line, exit 2, before work

def _bomb_png(path, side=100000):
    """A valid 1x1 PNG whose header then claims side x side pixels."""
    from PIL import Image

    Image.new("RGB", (1, 1)).save(path)
    b = bytearray(path.read_bytes())
    ihdr = b[12:29]  # b'IHDR' + 13 bytes
    ihdr[4:12] = struct.pack(">II", side, side)
    b[12:29] = ihdr
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("case", ["bomb-init", "out-under-a-file", "cfg-1e300", "steps-1e9", "embedding-string"])
def test_cli_user_errors_are_one_line_exit_2_before_work(tmp_path, capsys, monkeypatch, case):
    from fastdiff.cli import main

    monkeypatch.setattr(loader, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(loader, "_CACHE", {})
    (tmp_path / "afile").write_text("x")
    args = {"bomb-init": ["--init-image", str(tmp_path / "bomb.png")],
            "out-under-a-file": ["--out", str(tmp_path / "afile" / "sub")],
            "cfg-1e300": ["--cfg", "1e300"], "steps-1e9": ["--steps", str(10 ** 9)],
            "embedding-string": ["--embedding", str(tmp_path / "missing.pt")]}[case]
    if case == "bomb-init":
        _bomb_png(tmp_path / "bomb.png")
    named = {"bomb-init": "bomb.png", "out-under-a-file": "--out", "cfg-1e300": "guidance_scale",
             "steps-1e9": "steps", "embedding-string": "missing.pt"}[case]
    rc = main(["generate", "a cat", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("fastdiff generate: error: ") and named in err
    assert "Traceback" not in err


def test_bomb_init_image_is_refused_from_its_header(tmp_path, call_time):
    _bomb_png(tmp_path / "bomb.png")
    spent = best_time(lambda: refuses(ValueError, r"bomb\.png (is 100000x100000, more than max_pixels|is not a readable .*decompression bomb)",
                                      lambda: check_request("a", init_image=str(tmp_path / "bomb.png"))))
    assert spent <= 0.2 * call_time
    py_peak, rss = peak_growth(lambda: pytest.raises(ValueError, check_request, "a", init_image=str(tmp_path / "bomb.png")))
    assert py_peak < 1 * MB and rss < 64 * MB


# ------------------------------------------------------------------ 8. truncated zip records

def _cut_record(src, dst, keep=16):
    """Copy a torch zip file with its first tensor record cut to `keep` bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        cut = None
        for info in zin.infolist():
            data = zin.read(info)
            if cut is None and "/data/" in info.filename and len(data) > keep:
                cut, data = info.filename, data[:keep]
            zout.writestr(info.filename, data)
    return cut.split("/", 1)[1]


def test_truncated_zip_record_is_detected(pipe, reference, tmp_path):
    record = _cut_record(HN, tmp_path / "cut.pt")
    for load in (lambda p: load_pickle(p), read_hypernetwork, pipe.load_hypernetwork):
        refuses(FormatError, rf"cut\.pt: tensor record {record} holds 16 bytes", lambda: load(str(tmp_path / "cut.pt")))
    assert_unchanged(pipe, reference)


# ------------------------------------------------------------------ 9. arguments

BAD_ARGS = [
    (dict(prompt=None), r"prompt must be a string or a non-empty list of strings, got NoneType"),
    (dict(prompt=123), r"prompt must be .* got int"),
    (dict(prompt=[]), r"prompt must be .* got an empty list"),
    (dict(prompt=["a", 5]), r"prompt must be .* a list holding int"),
    (dict(negative_prompt=5), r"negative_prompt must be .* got int"),
    (dict(hypernetworks={HN: 0.5}), r"hypernetworks must be a list .* got dict"),
    (dict(hypernetworks=[(HN, 0.5, 99)]), r"hypernetworks: each item is a path or a \(path, strength\) pair"),
    (dict(hypernetworks=[(HN, "x")]), r"hypernetwork strength must be a finite number, got 'x'"),
    (dict(hypernetworks=[(HN, float("inf"))]), r"hypernetwork strength must be a finite number"),
    (dict(embeddings=PINK), r"embeddings must be a list of paths, got the single str"),
    (dict(embeddings=[3]), r"embeddings must be a list of paths"),
    (dict(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
    (dict(guidance_scale=True), r"guidance_scale must be a finite number, got True"),
    (dict(guidance_scale=1e300), r"guidance_scale must be in \[-1000, 1000\]"),
    (dict(steps=np.float64(3.0)), r"steps must be an integer >= 1"),
    (dict(seed=True), r"seed must be an integer"),
    (dict(init_image=torch.rand(3, 64, 64) * 255), r"init image tensor must hold values in \[0, 1\]"),
    (dict(init_image=torch.full((3, 64, 64), float("nan"))), r"init image tensor must hold values in \[0, 1\]"),
    (dict(sampler=["euler"]), r"unknown sampler"),
]


@pytest.mark.parametrize("kw,match", BAD_ARGS, ids=[str(list(k))[:30] + str(i) for i, (k, _) in enumerate(BAD_ARGS)])
def test_bad_arguments_are_named(pipe, reference, call_time, kw, match):
    spent = best_time(lambda: refuses(ValueError, match, lambda: run(pipe, **kw)))
    assert spent <= 0.2 * call_time
    assert_unchanged(pipe, reference)


def test_numpy_scalars_are_accepted(pipe, reference):
    got = run(pipe, seed=np.int64(1), steps=np.int32(3), guidance_scale=np.float32(7.0), width=np.int64(64),
              num_images=np.uint8(1))
    assert torch.equal(got, reference)
    assert run(pipe, negative_prompt=None).shape == reference.shape


# ------------------------------------------------------------------ 10. non-finite weights

def test_nan_in_a_model_is_named_at_load(tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "nan-model"
    shutil.copytree(DEFAULT_MODEL, d)
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    key = sorted(sd)[len(sd) // 2]
    sd[key].view(-1)[0] = float("inf")
    save_file(sd, str(f))
    refuses(FormatError, rf"diffusion_pytorch_model\.safetensors: tensor '{key}' holds 1 NaN/inf",
            lambda: fastdiff.load(str(d), device="cpu", dtype=torch.float32))


def test_finiteness_check_is_cheap_relative_to_the_load(monkeypatch):
    from fastdiff.formats import source

    real = source.check_finite

    def load_time(check):
        monkeypatch.setattr(source, "check_finite", real if check else (lambda *a: None))
        return best_time(lambda: fastdiff.load(device="cpu", dtype=torch.float32), repeat=1)

    # alternated, best of each: this machine's speed drifts over seconds
    checked, unchecked = float("inf"), float("inf")
    for _ in range(4):
        checked = min(checked, load_time(True))
        unchecked = min(unchecked, load_time(False))
    assert checked <= 1.55 * unchecked


def test_nan_in_a_hypernetwork_is_named(pipe, reference, tmp_path):
    data = torch.load(HN, weights_only=True)
    width = next(k for k in data if isinstance(k, int))
    key = sorted(data[width][1])[0]
    data[width][1][key].view(-1)[2] = float("nan")
    torch.save(data, tmp_path / "nan-hn.pt")
    refuses(FormatError, rf"nan-hn\.pt: tensor '{width}\.v\.{key}' holds 1 NaN/inf",
            lambda: pipe.load_hypernetwork(str(tmp_path / "nan-hn.pt")))
    assert_unchanged(pipe, reference)


def test_emphasis_overflow_is_refused_before_any_step(pipe, call_time):
    huge = "(red:1" + "0" * 40 + ")"
    spent = best_time(lambda: refuses(ValueError, r"prompt: emphasis weight 1e\+40 on 'red' is outside",
                                      lambda: run(pipe, prompt=huge)))
    assert spent <= 0.2 * call_time
    refuses(ValueError, r"negative_prompt: emphasis", lambda: run(pipe, negative_prompt=huge))


# ------------------------------------------------------------------ 11. smaller

def _a1111_parse(text):
    """A1111's reading of an infotext: lines starting 'Negative prompt:' start the negative
    prompt, the last line holds the settings."""
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), last


def test_prompt_cannot_forge_a_negative_prompt_in_the_infotext(pipe, tmp_path):
    r = pipe("a cat\nNegative prompt: forged\r\nSteps: 99", seed=1, steps=1)
    text = r.images[0].info["parameters"]
    prompt, negative, settings = _a1111_parse(text)
    assert negative == "" and "forged" in prompt and settings.startswith("Steps: 1,")
    r = pipe("a cat", negative_prompt="ugly\nNegative prompt: x", seed=1, steps=1)
    assert _a1111_parse(r.images[0].info["parameters"])[1] == "ugly Negative prompt: x"


def test_common_word_embedding_token_is_warned_about(pipe, tmp_path):
    path = tmp_path / "red.safetensors"
    save_file({"emb_params": torch.randn(1, 64)}, str(path))
    with pytest.warns(UserWarning, match=r"red\.safetensors: its token 'red' is an ordinary word"):
        assert pipe.load_embedding(str(path)) == "red"
    pipe.embeddings.pop("red")
    save_file({"emb_params": torch.randn(1, 64)}, str(tmp_path / "zq-style.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipe.load_embedding(str(tmp_path / "zq-style.safetensors")) == "zq-style"
    pipe.embeddings.pop("zq-style")


def test_duplicate_safetensors_keys_are_refused(tmp_path):
    path = tmp_path / "dup.safetensors"
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = ('{"emb_params": ' + entry + ', "emb_params": ' + entry + '}').encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    for read in (TensorFile, load_embedding):
        refuses(FormatError, r"dup\.safetensors: safetensors header names key 'emb_params' twice", lambda: read(str(path)))


def test_random_bytes_are_not_reported_as_code(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        path = tmp_path / f"r{i}.pt"
        path.write_bytes(b"\x80" + rng.bytes(300))
        with pytest.raises(FormatError) as e:
            load_pickle(str(path))
        assert "asks to run code" not in str(e.value) and f"r{i}.pt" in str(e.value)
    code = tmp_path / "code.pt"
    code.write_bytes(
        b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    with pytest.raises(FormatError, match=r"asks to run code \(os\.system\)"):
        load_pickle(str(code))


def test_save_prefix_cannot_leave_the_folder(pipe, tmp_path):
    r = pipe("a cat", seed=1, steps=1)
    out = tmp_path / "out"
    for prefix in ("../x-", "..\\x-", "a/b", "/abs"):
        refuses(ValueError, r"prefix .* must be the start of a file name", lambda: r.save(str(out), prefix=prefix))
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == []
    assert [os.path.basename(p) for p in r.save(str(out), prefix="ok-")] == ["ok-1.png"]
