"""fastdiff.dataset on the shipped shapes model: the seed rule (a sample's pixels equal
fastdiff.generate with its seed, bitwise on CPU fp32), shards and index read back with the
webdataset package and pyarrow, SIGKILL mid-run then resume equals an uninterrupted run byte
for byte, refusal of other arguments naming them, a failing caption fails only its shard, and
Ray Data with 2 local CPU workers writes the same bytes as one process."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

import fastdiff
from fastdiff import dataset

CAPTIONS = [
    "a red circle on a blue background, top left",
    "a green square on a yellow background",
    "",  # empty: reported, no images
    "an orange diamond on a purple background, bottom right",
    "a red circle on a blue background, top left",  # repeats row 0: its own seeds
    "a white triangle on a black background, centre",
    "an outlined blue star on a grey background",
    "a pink heart on a green background, top right",
    "a yellow circle on a red background",
    "a purple square on a white background, bottom left",
    "a black diamond on an orange background",
]
ARGS = dict(images_per_caption=2, steps=4, guidance_scale=2.0, seed=1000, shard_size=5)  # 2 captions a shard
ROWS = [i for i, c in enumerate(CAPTIONS) if c]


@pytest.fixture(scope="module")
def pipe():
    return fastdiff.load(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("captions") / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(pipe, captions_file, tmp_path_factory):
    """An uninterrupted run: (folder, stats)."""
    out = tmp_path_factory.mktemp("ref") / "ds"
    stats = dataset.build(captions_file, out, pipe=pipe, progress=False, **ARGS)
    return out, stats


def tree(folder):
    """name -> bytes of every file but stats.json (it holds this run's timings)."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if name != "stats.json"}


def stable_stats(folder):
    stats = json.loads((folder / "stats.json").read_text())
    stats.pop("run")
    return stats


def test_layout_read_back_with_webdataset_and_pyarrow(reference):
    import pyarrow.parquet as pq
    import webdataset as wds

    out, stats = reference
    n = ARGS["images_per_caption"]
    assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar", "00004.tar",
                                       "dataset.json", "index.parquet", "stats.json"]
    assert stats["complete"] and stats["images_done"] == stats["images"] == len(ROWS) * n
    assert stats["captions"]["empty_rows"] == [2] and stats["captions"]["duplicate_rows"] == [[4, 0]]
    assert stats["failures"] == [] and stats["run"]["images"] == len(ROWS) * n

    urls = [str(out / f"{k:05d}.tar") for k in range(5)]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == len(ROWS) * n
    shard_of = {}
    for k, s in enumerate(samples):
        i, j = ROWS[k // n], k % n  # caption order, a caption's images adjacent
        assert s["__key__"] == dataset.sample_key(i, j) == f"{i:09d}_{j:03d}"
        meta = json.loads(s["json"])
        assert s["txt"].decode() == CAPTIONS[i] == meta["caption"] == meta["parameters"]["prompt"]
        assert (meta["caption_index"], meta["image_index"]) == (i, j)
        assert meta["seed"] == meta["parameters"]["seed"] == ARGS["seed"] + i * n + j == dataset.seed_of(1000, i, j, n)
        assert meta["model_hash"] == meta["parameters"]["model_hash"] == "aaf08401a3"
        p = meta["parameters"]
        assert (p["steps"], p["guidance_scale"], p["sampler"], p["width"], p["height"]) == (4, 2.0, "euler_ancestral",
                                                                                             64, 64)
        img = Image.open(io.BytesIO(s["png"]))
        assert img.size == (64, 64) and img.info["parameters"] == meta["infotext"]
        shard_of.setdefault(i, set()).add(s["__url__"])
    assert all(len(v) == 1 for v in shard_of.values())  # every caption's images in one shard
    assert [len([i for i in shard_of if shard_of[i] == {u}]) for u in urls] == [2, 2, 2, 2, 2]

    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert [(r["key"], r["caption_index"], r["image_index"], r["seed"], r["caption"]) for r in rows] == [
        (s["__key__"], *(json.loads(s["json"])[k] for k in ("caption_index", "image_index", "seed", "caption")))
        for s in samples]
    assert [r["shard"] for r in rows] == [os.path.basename(s["__url__"]) for s in samples]
    # tar headers carry nothing of the run
    for m in tarfile.open(urls[0]):
        assert (m.mtime, m.uid, m.gid, m.uname, m.mode) == (0, 0, 0, "", 0o644)


def test_sample_equals_generate_with_its_seed(reference):
    out, _ = reference
    n = ARGS["images_per_caption"]
    with tarfile.open(out / "00003.tar") as tar:  # rows 7 and 8
        names = tar.getnames()
        png = tar.extractfile("000000007_001.png").read()
        meta = json.loads(tar.extractfile("000000007_001.json").read())
    assert names[:3] == ["000000007_000.png", "000000007_000.txt", "000000007_000.json"]
    seed = 1000 + 7 * n + 1
    assert meta["seed"] == seed
    got = np.asarray(Image.open(io.BytesIO(png)))
    kw = dict(steps=4, guidance_scale=2.0, device="cpu", dtype="float32")
    want = np.asarray(fastdiff.generate(CAPTIONS[7], seed=seed, **kw).images[0])
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert not np.array_equal(got, np.asarray(fastdiff.generate(CAPTIONS[7], seed=seed + 1, **kw).images[0]))


def test_sigkill_then_resume_equals_uninterrupted(reference, pipe, captions_file, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "ds"
    code = textwrap.dedent(f"""
        from fastdiff import dataset
        dataset.build({str(captions_file)!r}, {str(out)!r}, device="cpu", dtype="float32", progress=False,
                      **{ARGS!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (out.is_dir() and any(n.endswith(".tar") for n in os.listdir(out))):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no shard written in 120 s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    written = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    assert 1 <= len(written) < 5, f"the kill did not land mid-run: {written}"
    assert "stats.json" not in os.listdir(out) and "index.parquet" not in os.listdir(out)

    stats = dataset.build(captions_file, out, pipe=pipe, progress=False, **ARGS)
    assert stats["run"]["shards_skipped"] == len(written) and stats["complete"]
    assert [n for n in os.listdir(out) if n.endswith(".tmp")] == []
    assert tree(out) == tree(ref_out)  # the same files, byte for byte
    assert stable_stats(out) == stable_stats(ref_out)


@pytest.mark.parametrize("change, named", [
    (dict(guidance_scale=3.0, steps=5), ["guidance_scale (--cfg): 2.0 there, 3.0 now",
                                         "steps (--steps): 4 there, 5 now"]),
    (dict(images_per_caption=3), ["images_per_caption (--images-per-caption)"]),
    (dict(width=32, height=48), ["width/height (--size): 64x64 there, 32x48 now"]),
    (dict(format="webp", seed=1, negative_prompt="blurry"), ["format (--format)", "seed (--seed)",
                                                              "negative_prompt (--negative)"]),
    (dict(captions=CAPTIONS[:-1]), ["captions (CAPTIONS): 10 captions"]),
])
def test_other_arguments_refused_by_name(reference, pipe, captions_file, change, named):
    out, _ = reference
    before = tree(out)
    args = {**ARGS, **change}
    caps = args.pop("captions", captions_file)
    with pytest.raises(ValueError, match="other arguments") as e:
        dataset.build(caps, out, pipe=pipe, progress=False, **args)
    for text in named:
        assert text in str(e.value)
    assert "sampler" not in str(e.value)  # only what differs
    assert tree(out) == before


def test_same_captions_from_a_list_resume_the_file_run(reference, pipe, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(reference[0], out)
    before = tree(out)
    stats = dataset.build(CAPTIONS, out, pipe=pipe, progress=False, **ARGS)  # same rows, same seeds
    assert stats["run"]["shards_skipped"] == 5 and stats["run"]["images"] == 0
    assert tree(out) == before


def test_foreign_folder_refused(pipe, captions_file, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no dataset.json"):
        dataset.build(captions_file, tmp_path, pipe=pipe, progress=False, **ARGS)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_failed_caption_fails_its_shard_only_and_a_rerun_fills_it(reference, pipe, captions_file, tmp_path,
                                                                  monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "ds"
    submit = pipe.submit

    def failing(prompt, **kw):
        if prompt == CAPTIONS[5]:
            raise FloatingPointError("NaN in the output (injected)")
        return submit(prompt, **kw)

    monkeypatch.setattr(pipe, "submit", failing)
    stats = dataset.build(captions_file, out, pipe=pipe, progress=False, **ARGS)
    assert not stats["complete"] and stats["shards_done"] == 4
    assert stats["failures"] == [{"shard": "00002.tar", "captions": [5, 6],
                                  "error": "FloatingPointError: NaN in the output (injected)"}]
    assert "00002.tar" not in os.listdir(out) and not [n for n in os.listdir(out) if n.endswith(".tmp")]
    monkeypatch.setattr(pipe, "submit", submit)
    stats = dataset.build(captions_file, out, pipe=pipe, progress=False, **ARGS)
    assert stats["complete"] and stats["run"]["shards_skipped"] == 4 and stats["failures"] == []
    assert tree(out) == tree(ref_out)


def test_bad_arguments_named_before_loading(captions_file, tmp_path):
    for kw, text in [(dict(images_per_caption=0), "images_per_caption"), (dict(format="bmp"), "format"),
                     (dict(sampler="nope"), "sampler"), (dict(seed=2**32 - 5), "seed"),
                     (dict(width=30), "width"), (dict(workers=2), "workers")]:
        with pytest.raises(ValueError, match=text):
            dataset.build(captions_file, tmp_path / "x", model="/nonexistent", progress=False, **kw)
    assert not (tmp_path / "x").exists()


def test_ray_two_cpu_workers_equal_one_process(reference, captions_file, tmp_path):
    pytest.importorskip("ray.data")
    ref_out, _ = reference
    out = tmp_path / "ds"
    code = textwrap.dedent(f"""
        from fastdiff import dataset
        s = dataset.build({str(captions_file)!r}, {str(out)!r}, device="cpu", dtype="float32", progress=False,
                          ray=True, workers=2, **{ARGS!r})
        assert s["complete"] and s["run"]["workers"] == 2, s
    """)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    # Ray's start-up on a 2-core machine is slow; a hang must not stall the suite
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree(out) == tree(ref_out)
    assert stable_stats(out) == stable_stats(ref_out)
