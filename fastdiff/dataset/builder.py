"""`build()`: captions in, webdataset shards out, resumable.

The captions are read and checked, planned into shards, and the shards not yet on disk are
made by `worker.run_shards` in this process, or by Ray actors (`ray_data`). DIR/dataset.json
records the arguments that decide the output: a rerun with the same ones skips the finished
shards and redoes the rest; different ones are refused, naming what differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

from fastdiff.dataset import shards as S
from fastdiff.dataset.captions import Captions, from_rows, read_captions
from fastdiff.dataset.worker import Spec, run_shards
from fastdiff.request import LIMITS, check_request

MANIFEST = "dataset.json"
STATS = "stats.json"
INDEX_PARQUET = "index.parquet"
INDEX_JSONL = "index.jsonl"
LAYOUT = 1  # bump when the bytes written for the same arguments change

# manifest field -> how a person names it (API argument, CLI option)
ARGUMENTS = {
    "captions": "captions (CAPTIONS)",
    "model_hash": "model (--model)",
    "images_per_caption": "images_per_caption (--images-per-caption)",
    "guidance_scale": "guidance_scale (--cfg)",
    "steps": "steps (--steps)",
    "sampler": "sampler (--sampler)",
    "schedule": "schedule (--schedule)",
    "size": "width/height (--size)",
    "seed": "seed (--seed)",
    "negative_prompt": "negative_prompt (--negative)",
    "hypernetworks": "hypernetworks (--hypernetwork)",
    "clip_skip": "clip_skip (--clip-skip)",
    "format": "format (--format)",
    "shard_size": "shard_size (--shard-size)",
    "device": "device type (--device)",
    "dtype": "dtype (--dtype)",
    "layout": "fastdiff's dataset layout version",
}


def build(captions, out, *, model=None, images_per_caption: int = 10, guidance_scale: float = 2.0,
          steps: int = 20, sampler: str = "euler_ancestral", schedule: str = "normal", width=None, height=None,
          seed: int = 0, negative_prompt: str = "", hypernetworks=(), clip_skip: int = 1, format: str = "png",
          shard_size: int = 1000, caption_column: str | None = None, device=None, dtype=None, pipe=None,
          ray=None, workers: int | None = None, progress: bool = True) -> dict:
    """Generate `images_per_caption` images for every caption into webdataset shards in `out`.

    `captions`: a caption file (txt, JSONL, CSV/TSV, parquet; `caption_column` names the field,
    default `caption` then `text`) or a list of strings. Image j of caption i (its row in the
    file) uses seed `seed + i * images_per_caption + j`: `fastdiff.generate(caption, seed=...)`
    with the same arguments gives the same pixels. Shards hold whole captions, at most
    `shard_size` images each. Rerunning with the same arguments resumes; different ones raise
    ValueError naming them. `pipe`: an already loaded Pipeline to use instead of `model`.
    `ray`: run on a Ray cluster (True: `ray.init()`'s default, i.e. RAY_ADDRESS or a local one;
    a string: that address) with `workers` actors (default: one per GPU, else 1); `out` must
    then be a path every node sees. Returns the stats also written to `out/stats.json`."""
    t_start = time.perf_counter()
    log = _logger(progress)
    fmt = {"jpeg": "jpg"}.get(format, format)
    if fmt not in S.IMAGE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(S.IMAGE_FORMATS)}, got {format!r}")
    for name, v in (("images_per_caption", images_per_caption), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    use_ray = ray is not None and ray is not False
    if workers is not None:
        if not use_ray:
            raise ValueError("workers is the number of Ray actors: it needs ray (--ray)")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if use_ray and pipe is not None:
        raise ValueError("pipe and ray exclude each other: Ray actors load their own pipelines")

    caps = captions if isinstance(captions, Captions) else (
        from_rows(list(captions), source="<list>", format="list") if isinstance(captions, (list, tuple))
        else read_captions(captions, column=caption_column))
    for line in caps.report():
        log(line)
    if not len(caps):
        raise ValueError(f"{caps.source or 'captions'}: no captions (every row is empty)")
    n = images_per_caption
    # Checked once for the whole set (so the seed range covers every image); the per-call
    # limits on images and pixels apply to each caption's call, not to the set.
    req = check_request("caption", negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                        sampler=sampler, schedule=schedule, seed=seed, width=width, height=height,
                        num_images=caps.rows * n, hypernetworks=hypernetworks, clip_skip=clip_skip,
                        limits=LIMITS.with_(max_images=None, max_batch_pixels=None))

    out = os.path.abspath(os.fspath(out))
    ray_state = None
    if use_ray:
        from fastdiff.dataset import ray_data

        ray_state = ray_data.connect(None if ray is True else ray)
        if device is None:
            device = "cuda" if ray_state.gpus else "cpu"
    facts = _model_facts(model, pipe, device, dtype)
    w, h = req.width or facts["native_size"], req.height or facts["native_size"]
    hn = [(os.path.abspath(p), s) for p, s in req.hypernetworks]
    manifest = {
        "layout": LAYOUT, "captions": {"sha256": caps.sha256(), "captions": len(caps), "rows": caps.rows},
        "model_hash": facts["hash"], "images_per_caption": n, "guidance_scale": req.guidance_scale,
        "steps": req.steps, "sampler": req.sampler, "schedule": req.schedule, "size": [w, h], "seed": req.seed,
        "negative_prompt": req.negs[0], "hypernetworks": [[_file_sha256(p), s] for p, s in hn],
        "clip_skip": req.clip_skip, "format": fmt, "shard_size": shard_size,
        "device": facts["device"].type, "dtype": str(facts["dtype"]).removeprefix("torch."),
    }
    _claim(out, manifest, facts, caps, hn)

    spec = Spec(n, req.seed, fmt, dict(negative_prompt=req.negs[0], steps=req.steps,
                                       guidance_scale=req.guidance_scale, sampler=req.sampler,
                                       schedule=req.schedule, width=w, height=h, hypernetworks=hn,
                                       clip_skip=req.clip_skip, output_type="pil"))
    plan = S.plan(caps.indices, caps.texts, shard_size, n)
    partials = S.remove_partials(out)
    finished = {s.index for s in plan if os.path.isfile(os.path.join(out, s.name))}
    todo = [s for s in plan if s.index not in finished]
    if finished:
        log(f"resuming: {len(finished)} of {len(plan)} shards already written"
            + (f", {partials} partial files removed" if partials else ""))
    total = len(caps) * n
    done_before = sum(len(s.captions) for s in plan if s.index in finished) * n

    if todo and not use_ray and pipe is None:
        import fastdiff

        pipe = fastdiff.load(facts["path"], device=facts["device"], dtype=facts["dtype"])
    bar = _bar(total, done_before, progress)
    failures, made = [], 0
    t_gen = time.perf_counter()
    try:
        results = ()
        if todo and use_ray:  # the actors load their pipelines inside this run's time
            workers = workers or max(1, ray_state.gpus if facts["device"].type == "cuda" else 1)
            results = ray_data.run(todo, spec, out, model=facts["path"], device=str(facts["device"]),
                                   dtype=manifest["dtype"], workers=workers, cpus=ray_state.cpus,
                                   on_images=bar.update)
        elif todo:
            results = ((s.index, err) for s, err in run_shards(pipe, todo, spec, out, on_images=bar.update))
        for index, err in results:
            shard = plan[index]
            if err is None:
                made += len(shard.captions) * n
                continue
            msg = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
            failures.append({"shard": shard.name, "captions": [shard.captions[0][0], shard.captions[-1][0]],
                             "error": msg})
            bar.write(f"shard {shard.name} failed: {msg}")
    finally:
        bar.close()
        if ray_state is not None:
            ray_state.close()
    t_end = time.perf_counter()

    present = [s for s in plan if os.path.isfile(os.path.join(out, s.name))]
    index_name = _write_index(out, present, n, req.seed)
    gen_seconds = t_end - t_gen if made else 0.0
    stats = {
        "captions": caps.summary(), "images_per_caption": n, "shards": len(plan), "images": total,
        "shards_done": len(present), "images_done": sum(len(s.captions) for s in present) * n,
        "complete": len(present) == len(plan), "index": index_name, "failures": failures,
        "run": {"images": made, "seconds": round(gen_seconds, 3),
                "images_per_second": round(made / gen_seconds, 4) if gen_seconds > 0 else None,
                "startup_seconds": round(t_gen - t_start, 3),
                "shards_skipped": len(finished), "partial_files_removed": partials,
                "device": str(facts["device"]), "dtype": manifest["dtype"],
                "torch_threads": _threads() if facts["device"].type == "cpu" else None,
                "ray": None if not use_ray else (ray if isinstance(ray, str) else "default"),
                "workers": workers if use_ray else None},
    }
    S.write_atomic(os.path.join(out, STATS), (json.dumps(stats, indent=2) + "\n").encode())
    log(f"{stats['images_done']}/{total} images in {len(present)}/{len(plan)} shards in {out}"
        + (f"; this run: {made} images, {made / gen_seconds:.2f} images/s" if made else "")
        + (f"; {len(failures)} shards failed (rerun to retry them)" if failures else ""))
    return stats


def _logger(enabled):
    def log(line):
        if enabled:
            print(line, file=sys.stderr, flush=True)
    return log


def _bar(total, initial, enabled):
    from tqdm import tqdm

    # tqdm's rate and ETA count only this run's images (those after `initial`)
    return tqdm(total=total, initial=initial, unit="img", desc="fastdiff dataset", disable=not enabled,
                smoothing=0.1, dynamic_ncols=True)


def _model_facts(model, pipe, device, dtype) -> dict:
    """Path, hash, native size, device and dtype, without loading the weights (a rerun with
    other arguments is refused before any loading)."""
    from fastdiff import loader

    if pipe is not None:
        return {"path": pipe.info.path, "hash": str(pipe.info.hash), "native_size": pipe.info.native_size,
                "device": pipe.device, "dtype": pipe.dtype}
    from fastdiff.formats import open_model

    path = loader.default_model() if model is None else os.path.abspath(os.fspath(model))
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path} does not exist")
    src = open_model(path)
    device, dtype = loader._device_dtype(device, dtype)
    return {"path": path, "hash": str(loader.ModelHash(src)), "native_size": loader.native_size(src),
            "device": device, "dtype": dtype}


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _claim(out, manifest, facts, caps, hn) -> None:
    """A new DIR gets the manifest; an existing one must have been made with the same arguments."""
    path = os.path.join(out, MANIFEST)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f).get("arguments", {})
        diffs = [f"{ARGUMENTS.get(k, k)}: {_show(k, old.get(k))} there, {_show(k, manifest.get(k))} now"
                 for k in ARGUMENTS if old.get(k) != manifest.get(k)]
        if diffs:
            raise ValueError(f"{out} holds a dataset made with other arguments; use another output folder or "
                             f"the same arguments. Differences: " + "; ".join(diffs))
        return
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out} is not empty and holds no {MANIFEST}: not a fastdiff dataset to resume")
    os.makedirs(out, exist_ok=True)
    record = {"arguments": manifest,
              "for_people": {"captions": caps.source, "model": facts["path"],
                             "hypernetworks": [p for p, _ in hn], "fastdiff": _version()}}
    S.write_atomic(path, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode())


def _show(key, value):
    if key == "captions" and isinstance(value, dict):
        return f"{value.get('captions')} captions (sha256 {str(value.get('sha256'))[:12]})"
    if key == "size" and isinstance(value, list):
        return "x".join(map(str, value))
    return json.dumps(value, ensure_ascii=False)


def _threads():
    import torch

    return torch.get_num_threads()


def _version():
    from fastdiff import __version__

    return __version__


def _write_index(out, shards, n, base) -> str:
    """Every sample of the finished shards: key, shard, caption index, image index, seed,
    caption. Parquet when pyarrow is installed, else JSONL."""
    rows = [(S.sample_key(i, j), s.name, i, j, S.seed_of(base, i, j, n), text)
            for s in shards for i, text in s.captions for j in range(n)]
    names = ("key", "shard", "caption_index", "image_index", "seed", "caption")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        lines = [json.dumps(dict(zip(names, r)), ensure_ascii=False) for r in rows]
        S.write_atomic(os.path.join(out, INDEX_JSONL), ("\n".join(lines) + "\n" if lines else "").encode())
        return INDEX_JSONL
    import io

    cols = list(zip(*rows)) if rows else [()] * len(names)
    types = (pa.string(), pa.string(), pa.int64(), pa.int32(), pa.int64(), pa.string())
    table = pa.table({k: pa.array(list(c), type=t) for k, c, t in zip(names, cols, types)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    S.write_atomic(os.path.join(out, INDEX_PARQUET), buf.getvalue())
    return INDEX_PARQUET
