"""Markdown tables for README from committed results: python benchmarks/table.py [pipeline.json kernels.json]."""
import glob
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def latest(kind):
    files = sorted(glob.glob(str(RESULTS / f"{kind}-*.json")), key=lambda p: Path(p).stat().st_mtime)
    return files[-1] if files else None


def pipeline_table(path):
    d = json.load(open(path))
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
    out = [f"{d['device']}, {d['dtype']}, torch {d['torch']}, triton {d['triton']}, diffusers {d['diffusers']}, "
           f"commit {d['git_commit']} ({Path(path).name})", "",
           "| what | diffusers ms | fastdiff ms | speed-up |", "|---|---:|---:|---:|"]
    for name, theirs, ours in rows:
        if theirs is not None:
            out.append(f"| {name} | {theirs:.1f} | {ours:.1f} | {theirs / ours:.2f}x |")
    m = r["peak_memory"]
    out.append(f"| peak GPU memory, 20-step image | {m['bytes_diffusers'] / 2**30:.2f} GiB | "
               f"{m['bytes_fastdiff'] / 2**30:.2f} GiB | {m['ratio_fastdiff_over_diffusers']:.2f}x the memory |")
    f = r["fidelity"]
    out += ["", f"fp16 graph path vs fastdiff fp32: PSNR {f['psnr_fp16_graph_vs_fp32_db']:.1f} dB; graph vs eager "
            f"fp16 latents: max abs difference {f['max_abs_graph_vs_eager_fp16_latents']:g} ({f['what']})."]
    if "ms_fastdiff_graph_step_channels_last" in u:
        out.append(f"UNet step with `channels_last=True` (option, not yet the default): "
                   f"{u['ms_fastdiff_graph_step_channels_last']:.1f} ms; fastdiff eager (no graph): "
                   f"{u['ms_fastdiff_eager']:.1f} ms.")
    return "\n".join(out)


def kernels_table(path):
    d = json.load(open(path))
    out = [f"{d['device']}, fp16, commit {d['git_commit']} ({Path(path).name}); ceilings measured: copy "
           f"{d['ceilings']['copy_GBps']:.0f} GB/s, fp16 matmul {d['ceilings']['matmul_fp16_TFLOPs']:.0f} TFLOP/s", "",
           "| case | fastdiff ms | torch ms | speed-up | rate | of ceiling | speed-up, eager calls |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in d["results"]:
        out.append(f"| {r['name']} | {r['ms_fastdiff']:.4f} | {r['ms_torch']:.4f} | {r['speedup']:.2f}x | "
                   f"{r['rate_fastdiff']:.0f} {r['unit']} | {100 * r['share_of_ceiling_fastdiff']:.0f}% | "
                   f"{r['speedup_eager']:.2f}x |")
    return "\n".join(out)


if __name__ == "__main__":
    p = sys.argv[1] if len(sys.argv) > 1 else latest("pipeline")
    k = sys.argv[2] if len(sys.argv) > 2 else latest("kernels")
    print(pipeline_table(p))
    print()
    print(kernels_table(k))
