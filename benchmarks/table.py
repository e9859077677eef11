"""Markdown tables from the committed results in benchmarks/results/*.json.

    python benchmarks/table.py            # print docs/benchmarks.md
    python benchmarks/table.py --write    # write docs/benchmarks.md and README.md's table
    python benchmarks/table.py FILE.json  # one result file's table

Each result file's name starts with its kind (`pipeline-`, `kernels-`, `sweep-`, ...). Known
kinds get their own table; any other kind is rendered generically (its scalar fields), so a
new benchmark shows up without changes here. Every table states the device, dtype, shapes,
baseline and commit that its file records. tests/test_table.py checks that the committed
docs are what this script renders.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
# README.md quotes one pipeline run between these markers; the file named in the first one.
README_BEGIN = re.compile(r"<!-- table\.py: (\S+\.json) -->\n")
README_END = "<!-- /table.py -->"


def _load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def kind_of(path) -> str:
    return Path(path).name.split("-", 1)[0]


def header(d: dict, path, dtype=None) -> str:
    """One line: device, dtype, software versions, date, commit, file."""
    parts = [d.get("device", "unknown device")]
    if dtype or d.get("dtype"):
        parts.append(str(dtype or d.get("dtype")))
    for k in ("torch", "triton", "diffusers"):
        if k in d:
            parts.append(f"{k} {d[k]}")
    if "date" in d:
        parts.append(str(d["date"]))
    parts.append(f"commit {d.get('git_commit', 'unknown')}")
    return ", ".join(parts) + f" (`{Path(path).name}`)"


def pipeline_table(path) -> str:
    d = _load(path)
    r = d["results"]
    u = r["unet_step"]
    rows = [
        ("UNet step, batch 2 (CFG), 64x64 latent", u["ms_diffusers"], u["ms_fastdiff_graph_step"]),
        ("UNet step vs torch.compile(diffusers UNet)", u.get("ms_diffusers_compiled"), u["ms_fastdiff_graph_step"]),
        ("VAE decode 512x512", r["vae_decode"]["ms_diffusers"], r["vae_decode"]["ms_fastdiff"]),
        ("text encoding (prompt + negative)", r["text_encode"]["ms_diffusers"], r["text_encode"]["ms_fastdiff"]),
        ("whole image 512x512, 20 steps", r["image_20"]["ms_diffusers"], r["image_20"]["ms_fastdiff"]),
        ("whole image 512x512, 50 steps", r["image_50"]["ms_diffusers"], r["image_50"]["ms_fastdiff"]),
    ]
    out = [header(d, path), "",
           f"{d.get('configuration', '')}; UNet input {u.get('shape', '?')}; "
           f"baseline: {d.get('baseline', 'diffusers')}.", "",
           "| what | diffusers ms | fastdiff ms | speed-up |", "|---|---:|---:|---:|"]
    for name, theirs, ours in rows:
        if theirs is not None:
            out.append(f"| {name} | {theirs:.1f} | {ours:.1f} | {theirs / ours:.2f}x |")
    m = r.get("peak_memory")
    if m:
        out.append(f"| peak GPU memory, 20-step image | {m['bytes_diffusers'] / 2**30:.2f} GiB | "
                   f"{m['bytes_fastdiff'] / 2**30:.2f} GiB | {m['ratio_fastdiff_over_diffusers']:.2f}x the memory |")
    f = r.get("fidelity")
    if f:
        out += ["", f"fp16 graph path vs fastdiff fp32: PSNR {f['psnr_fp16_graph_vs_fp32_db']:.1f} dB; graph vs "
                f"eager fp16 latents: max abs difference {f['max_abs_graph_vs_eager_fp16_latents']:g} ({f['what']})."]
    if "ms_fastdiff_graph_step_channels_last" in u:
        out.append(f"UNet step with `channels_last=True` (an option, not the default): "
                   f"{u['ms_fastdiff_graph_step_channels_last']:.1f} ms; fastdiff eager (no graph): "
                   f"{u['ms_fastdiff_eager']:.1f} ms.")
    return "\n".join(out)


def kernels_table(path) -> str:
    d = _load(path)
    eager = all("speedup_eager" in r for r in d["results"])
    c = d["ceilings"]
    out = [header(d, path, "fp16"), "",
           f"{d.get('notes', '')} Baseline: the torch op at the same shape (SDPA for attention). "
           f"Ceilings measured: copy {c['copy_GBps']:.0f} GB/s, fp16 matmul {c['matmul_fp16_TFLOPs']:.0f} TFLOP/s.",
           "", "| case | fastdiff ms | torch ms | speed-up | rate | of ceiling |" + (" speed-up, eager calls |" if eager else ""),
           "|---|---:|---:|---:|---:|---:|" + ("---:|" if eager else "")]
    for r in d["results"]:
        line = (f"| {r['name']} | {r['ms_fastdiff']:.4f} | {r['ms_torch']:.4f} | {r['speedup']:.2f}x | "
                f"{r['rate_fastdiff']:.0f} {r['unit']} | {100 * r['share_of_ceiling_fastdiff']:.0f}% |")
        out.append(line + (f" {r['speedup_eager']:.2f}x |" if eager else ""))
    return "\n".join(out)


# The sweep's baseline column and the configuration each kernel ran with before the sweep.
SWEEP_PARTS = {"gn": ("GroupNorm (+ SiLU)", "torch", "split", "speedup_split"),
               "ln": ("LayerNorm", "torch", "default", "speedup_default"),
               "attn": ("attention", "sdpa", "autotuned", "speedup_autotuned")}


def sweep_table(path) -> str:
    d = _load(path)
    out = [header(d, path, "fp16"), "", f"{d.get('notes', '')}. Each row: the baseline, the configuration "
           "the kernel used before this sweep, and the fastest configuration tried."]
    for key, (title, base, before, sp_before) in SWEEP_PARTS.items():
        rows = d.get(key)
        if not rows:
            continue
        out += ["", f"{title}: {len(rows)} shapes, baseline {base}", "",
                f"| case | {base} ms | {before} ms | speed-up, {before} | fastest | its ms | its speed-up |",
                "|---|---:|---:|---:|---|---:|---:|"]
        for r in rows:
            ms = r["ms"]
            out.append(f"| {r['name']} | {ms[base]:.4f} | {_ms(ms.get(before))} | {_x(r.get(sp_before))} | "
                       f"{r['best']} | {_ms(ms.get(r['best']))} | {_x(r.get('speedup_best'))} |")
    return "\n".join(out)


def _ms(v):
    return "-" if v is None else f"{v:.4f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def generic_table(path) -> str:
    """Any other kind: its header and its results' scalar fields (a list of rows, or a flat
    key/value table of nested dicts)."""
    d = _load(path)
    out = [header(d, path)]
    if d.get("notes"):
        out += ["", str(d["notes"])]
    res = d.get("results")
    if isinstance(res, list) and res and all(isinstance(r, dict) for r in res):
        cols = [k for k in dict.fromkeys(k for r in res for k in r) if all(
            not isinstance(r.get(k), (dict, list)) for r in res)]
        out += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_fmt(r.get(k, "")) for k in cols) + " |" for r in res]
    elif isinstance(res, dict):
        flat = {}

        def walk(prefix, v):
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), x)
            elif not isinstance(v, list):
                flat[prefix] = v
        walk("", res)
        out += ["", "| field | value |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
    return "\n".join(out)


def _targets(d: dict) -> list[str]:
    met = d.get("targets_met") or {}
    out = []
    for (name, v), ok in zip((d.get("targets") or {}).items(), list(met.values()) + [None] * len(d.get("targets") or {})):
        out.append(f"- {name}: {_fmt(v) if not isinstance(v, float) else f'{v:.2f}'}"
                   + ("" if ok is None else (" (met)" if ok else " (missed)")))
    return out


def engine_table(path) -> str:
    """benchmarks/bench_engine.py: latency and throughput under open-loop Poisson load."""
    d = _load(path)
    out = [header(d, path), "",
           f"{d['model']}, {d['size']}, {d['steps']} steps {d['sampler']}, CFG {d['guidance_scale']}, "
           f"max_batch {d['max_batch']}{', CUDA graphs' if d.get('cuda_graphs') else ''}; one image per request. "
           f"Unloaded latency {d['unloaded_latency_s']:.3f} s; peak (continuous, all at once) "
           f"{d['peak_continuous_img_s']:.2f} img/s; best offline batched pipe() "
           f"{max(d['offline_img_s'].values()):.2f} img/s (max_batch {d['best_offline_max_batch']}).",
           "", "| load | policy | offered img/s | served img/s | p50 s | p95 s | p99 s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(d["runs"].values(), key=lambda r: (r["load"], ["continuous", "static", "serial"].index(r["policy"]))):
        out.append(f"| {r['load']:.0%} | {r['policy']} | {r['rate_img_s']:.2f} | {r['throughput_img_s']:.2f} | "
                   f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['p99_s']:.3f} |")
    return "\n".join(out + [""] + _targets(d))


def serve_table(path) -> str:
    """benchmarks/bench_serve.py: the HTTP server with batching and with --max-batch 1."""
    d = _load(path)
    out = [header(d, path), "", f"{d['model']}, {d['size']}, {d['steps']} steps {d['sampler']}, CFG "
           f"{d['guidance_scale']}; {d['compares']}. A direct pipe() call: {d['direct_pipe_s']:.3f} s.",
           "", "| server | clients | requests | img/s | p50 s | p95 s | p99 s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, run in d["runs"].items():
        for lv in run["levels"]:
            out.append(f"| {name} (max_batch {run['max_batch']}) | {lv['clients']} | {lv['requests']} | "
                       f"{lv['img_s']:.2f} | {lv['p50_s']:.3f} | {lv['p95_s']:.3f} | {lv['p99_s']:.3f} |")
    return "\n".join(out + [""] + _targets(d))


def dataset_table(path) -> str:
    """benchmarks/bench_dataset.py: `fastdiff dataset` against the best batched pipe() loop."""
    d = _load(path)
    loops = ", ".join(f"{k} captions/call {v:.2f}" for k, v in d["pipe_loop_img_s"].items())
    out = [header(d, path), "", f"{d['model']}, {d['size']}, {d['steps']} steps {d['sampler']}, CFG "
           f"{d['guidance_scale']}, {d['captions']} captions x {d['images_per_caption']} images, "
           f"{d['format']}, max_batch {d['max_batch']}; {d['compares']}.", "",
           "| run | img/s |", "|---|---:|",
           f"| best pipe() loop ({d['best_group']} captions per call) | {d['best_pipe_loop_img_s']:.2f} |",
           f"| fastdiff dataset | {d['dataset_img_s']:.2f} |"]
    if d.get("ray"):
        r = d["ray"]
        out.append(f"| fastdiff dataset --ray, {r['workers']} workers (wall, start-up included) | {r['wall_img_s']:.2f} |")
    return "\n".join(out + ["", f"pipe() loop by captions per call (img/s): {loops}.", ""] + _targets(d))


KINDS = {"pipeline": ("Whole pipeline: fastdiff vs diffusers", pipeline_table),
         "dataset": ("fastdiff dataset vs a batched pipe() loop", dataset_table),
         "engine": ("The engine under load: continuous vs static batching vs one at a time", engine_table),
         "serve": ("fastdiff serve over HTTP", serve_table),
         "kernels": ("Kernels vs torch", kernels_table),
         "sweep": ("Kernel launch-parameter sweep", sweep_table)}


def render_file(path) -> str:
    k = kind_of(path)
    fn = KINDS[k][1] if k in KINDS else generic_table
    try:
        return fn(path)
    except (KeyError, TypeError, ValueError) as e:  # a file this renderer does not understand
        return f"{header(_load(path), path)}\n\n(not rendered: missing or unexpected field {e})"


def runs() -> dict:
    """kind -> result files, newest date first (same date: by file name)."""
    by_kind: dict = {}
    for p in sorted(RESULTS.glob("*.json")):
        by_kind.setdefault(kind_of(p), []).append(p)
    for ps in by_kind.values():
        ps.sort(key=lambda p: str(_load(p).get("date", "")), reverse=True)  # stable: names stay in order
    return by_kind


INTRO = """# Benchmarks

Rendered by `python benchmarks/table.py --write` from the JSON files in `benchmarks/results/`
(each holds every number with its device, versions and commit); do not edit by hand.
`bash benchmarks/run_gpu.sh` on a machine with a CUDA GPU builds fastdiff, runs the CUDA tests
and writes new result files (`fastdiff bench --compile`, `benchmarks/bench_kernels.py`, and with
`SWEEP=gn,ln,attn` `benchmarks/sweep_kernels.py`); set `FASTDIFF_COMMIT` so they record the
commit measured. The pipeline runs use random weights with the real SD 1.5 architecture, the
same weights and prompt for both sides. Runs are listed newest first; each table names its run.
"""


def render_doc() -> str:
    parts = [INTRO]
    by_kind = runs()
    order = [k for k in KINDS if k in by_kind] + sorted(k for k in by_kind if k not in KINDS)
    for k in order:
        title = KINDS[k][0] if k in KINDS else f"{k} (rendered generically)"
        parts.append(f"## {title}\n")
        for p in by_kind[k]:
            parts.append(render_file(p) + "\n")
    return "\n".join(parts)


def render_readme(text: str) -> str:
    """README.md with the table between its markers re-rendered from the file the marker names."""
    m = README_BEGIN.search(text)
    if not m:
        return text
    end = text.index(README_END, m.end())
    return text[:m.end()] + "\n" + pipeline_table(RESULTS / m.group(1)) + "\n\n" + text[end:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="result files to render (default: all, as docs/benchmarks.md)")
    p.add_argument("--write", action="store_true", help="write docs/benchmarks.md and README.md's table")
    a = p.parse_args(argv)
    if a.files:
        print("\n\n".join(render_file(f) for f in a.files))
    elif a.write:
        DOC.write_text(render_doc())
        README.write_text(render_readme(README.read_text()))
    else:
        sys.stdout.write(render_doc())
    return 0


if __name__ == "__main__":
    sys.exit(main())
