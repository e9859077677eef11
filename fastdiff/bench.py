"""fastdiff against the PyTorch baseline (diffusers StableDiffusionPipeline, fp16, SDPA) on
identical random weights with the real SD 1.5 architecture (UNet 860M, KL VAE, CLIP ViT-L/14
text encoder; random weights, so nothing is downloaded).

Rows, each measured side by side in one process (CUDA events or synchronised wall clock,
median of several runs after warm-up):

- unet_step: one UNet evaluation, batch 2 (CFG), 64x64 latents, 77-token context. fastdiff
  eager (its Triton kernels) and fastdiff's graphed denoiser step (input scaling + UNet +
  guidance, replayed from a CUDA graph) against diffusers' UNet forward; with --compile also
  torch.compile(diffusers UNet) as a second baseline row.
- vae_decode: 64x64 latents -> 512x512 image, batch 1.
- text_encode: prompt + negative prompt -> context, tokenisation included.
- image_20 / image_50: a whole 512x512 image (euler_ancestral, CFG 7, PIL output).
- peak_memory: max_memory_allocated over a warm 20-step image, each pipeline alone in its own
  process (weights, CUDA-graph pools and activations).
- fidelity: fastdiff's fp16 graph path vs its fp32 path (PSNR of the decoded 8-bit images)
  and vs its eager fp16 path (relative error of the final latents), same seed.

    fastdiff bench [--compile] [--quick] [--out DIR]     (= python -m fastdiff.bench)
    pytest benchmarks/bench_pipeline.py --benchmark-enable

Needs diffusers and transformers (`pip install fastdiff[bench]`). On CUDA it writes
pipeline-<device>-<date>.json (device, versions, commit, numbers) to --out, by default
benchmarks/results in a source checkout, else the current folder. Without CUDA it runs a reduced configuration (tiny models,
64x64, 2 steps) so CI exercises the code; those timings are not comparable and the JSON goes
to a temporary folder unless --out is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results" if (ROOT / "benchmarks").is_dir() else Path.cwd()
CUDA = torch.cuda.is_available()
PROMPT = "a photograph of an astronaut riding a horse, highly detailed"
NEGATIVE = "blurry, low quality"

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_CLIP = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, "projection_dim": 768,
}
# The reduced CPU configuration: same code paths, tiny widths.
TINY_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": [32, 64, 64], "cross_attention_dim": 64,
             "down_block_types": ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2}
TINY_VAE = {**SD15_VAE, "sample_size": 64, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
TINY_CLIP = {**SD15_CLIP, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 1, "projection_dim": 64}


# ---------------------------------------------------------------------------------- model


def build_model_folder(root: Path, tiny: bool) -> Path:
    """A diffusers StableDiffusionPipeline folder with random weights (seeded), fp16 on disk
    (fp32 for the tiny CPU configuration); kept and reused if `root` already holds one."""
    from fastdiff.random_model import write_random_model

    if (root / "model_index.json").exists():
        return root
    configs = {"unet": TINY_UNET if tiny else SD15_UNET, "vae": TINY_VAE if tiny else SD15_VAE,
               "text_encoder": TINY_CLIP if tiny else SD15_CLIP}
    write_random_model(str(root), configs, seed=0, dtype=torch.float32 if tiny else torch.float16, scheduler={
        "_class_name": "EulerAncestralDiscreteScheduler", "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "timestep_spacing": "linspace"})
    return root


def load_diffusers(root: Path, device, dtype):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(root), torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_fastdiff(root: Path, device, dtype, **kw):
    import fastdiff

    return fastdiff.load(str(root), device=device, dtype=dtype, **kw)


# --------------------------------------------------------------------------------- timing


def sync():
    if CUDA:
        torch.cuda.synchronize()


def time_ms(fn, warmup=3, reps=7, min_ms=50.0):
    """Median milliseconds per call: warm up, synchronise, then timed batches of calls."""
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    fn()
    sync()
    one = (time.perf_counter() - t) * 1e3
    iters = max(1, min(200, int(math.ceil(min_ms / max(one, 1e-3)))))
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3 / iters)
    return statistics.median(times)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ----------------------------------------------------------------------------------- rows


class Bench:
    def __init__(self, root: Path, tiny: bool, compile_baseline: bool = False):
        self.tiny = tiny
        self.device = "cuda" if CUDA else "cpu"
        self.dtype = torch.float16 if CUDA else torch.float32
        self.size = 64 if tiny else 512
        self.steps = (2, 3) if tiny else (20, 50)
        self.root = root
        self.compile_baseline = compile_baseline
        self.ref = load_diffusers(root, self.device, self.dtype)
        self.fd = load_fastdiff(root, self.device, self.dtype)
        self.rows = {}

    def unet_step(self):
        from fastdiff.denoiser import Conditioning

        h = self.size // 8
        g = torch.Generator(self.device).manual_seed(0)
        x = torch.randn(2, 4, h, h, device=self.device, dtype=self.dtype, generator=g)
        ctx = torch.randn(2, 77, self.fd.text_encoder.config.hidden_size, device=self.device,
                          dtype=self.dtype, generator=g)
        t = torch.full((2,), 500.0, device=self.device)
        row = {"shape": f"x [2, 4, {h}, {h}], context [2, 77, {ctx.shape[-1]}]", "dtype": str(self.dtype)}
        with torch.inference_mode():
            ref_out = self.ref.unet(x, t, ctx).sample
            ours = self.fd.unet(x, t, ctx)
            row["rel_err_eager_vs_diffusers"] = float((ours.double() - ref_out.double()).norm() / ref_out.double().norm())
            row["ms_diffusers"] = time_ms(lambda: self.ref.unet(x, t, ctx))
            row["ms_fastdiff_eager"] = time_ms(lambda: self.fd.unet(x, t, ctx))
            if CUDA:
                # One denoiser step as the engine makes it for one image with CFG: inputs
                # scaled into the graph's buffers, the 2-row bucket's graph replayed, guidance
                # folded into x0 by one lincomb.
                cond = Conditioning(ctx[1:2], ctx[0:1], 7.0)
                x1 = x[:1].float()
                row["ms_fastdiff_graph_step"] = time_ms(lambda: self.fd.denoiser([(cond, x1, 3.0)]))
                # the same with the UNet's convolutions in channels_last (NHWC)
                cl = load_fastdiff(self.root, self.device, self.dtype, channels_last=True)
                row["ms_fastdiff_graph_step_channels_last"] = time_ms(lambda: cl.denoiser([(cond, x1, 3.0)]))
                del cl
                torch.cuda.empty_cache()
            if self.compile_baseline and CUDA:
                compiled = torch.compile(self.ref.unet)
                t0 = time.perf_counter()
                compiled(x, t, ctx)
                sync()
                row["compile_s"] = time.perf_counter() - t0
                row["ms_diffusers_compiled"] = time_ms(lambda: compiled(x, t, ctx))
        best = row.get("ms_fastdiff_graph_step", row["ms_fastdiff_eager"])
        row["speedup_vs_diffusers"] = row["ms_diffusers"] / best
        if "ms_diffusers_compiled" in row:
            row["speedup_vs_compiled"] = row["ms_diffusers_compiled"] / best
        self.rows["unet_step"] = row

    def vae_decode(self):
        h = self.size // 8
        z = torch.randn(1, 4, h, h, device=self.device, dtype=self.dtype,
                        generator=torch.Generator(self.device).manual_seed(1))
        with torch.inference_mode():
            ms_ref = time_ms(lambda: self.ref.vae.decode(z).sample, reps=5)
            ms_ours = time_ms(lambda: self.fd.vae.decode(z), reps=5)
        self.rows["vae_decode"] = {"shape": f"[1, 4, {h}, {h}] -> [1, 3, {self.size}, {self.size}]",
                                   "ms_diffusers": ms_ref, "ms_fastdiff": ms_ours, "speedup": ms_ref / ms_ours}

    def text_encode(self):
        with torch.inference_mode():
            ms_ref = time_ms(lambda: self.ref.encode_prompt(PROMPT, self.device, 1, True, NEGATIVE))
            ms_ours = time_ms(lambda: self.fd.encode_prompt([NEGATIVE, PROMPT]))
        self.rows["text_encode"] = {"what": "prompt + negative prompt, tokenisation included",
                                    "ms_diffusers": ms_ref, "ms_fastdiff": ms_ours, "speedup": ms_ref / ms_ours}

    def image(self, steps: int, reps: int = 3):
        s = self.size

        def theirs():
            return self.ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0,
                            height=s, width=s, generator=torch.Generator("cpu").manual_seed(0)).images

        def ours():
            return self.fd(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=7.0, seed=0,
                           sampler="euler_ancestral", width=s, height=s).images

        ms_ref = time_ms(theirs, warmup=1, reps=reps, min_ms=0)
        ms_ours = time_ms(ours, warmup=1, reps=reps, min_ms=0)
        self.rows[f"image_{steps}"] = {"size": f"{s}x{s}", "steps": steps, "sampler": "euler_ancestral",
                                       "cfg": 7.0, "ms_diffusers": ms_ref, "ms_fastdiff": ms_ours,
                                       "speedup": ms_ref / ms_ours}

    def fidelity(self):
        """fp16 graph path vs fp32 path (PSNR) and vs eager fp16 (latents)."""
        if not CUDA:
            return
        kw = dict(steps=self.steps[0], seed=7, width=self.size, height=self.size, num_images=2,
                  guidance_scale=7.0, sampler="euler_ancestral")
        fast_np = self.fd(PROMPT, output_type="np", **kw).images
        fast_lat = self.fd(PROMPT, output_type="latent", **kw).images
        eager = load_fastdiff(self.root, self.device, self.dtype, cuda_graphs=False)
        eager_lat = eager(PROMPT, output_type="latent", **kw).images
        del eager
        cl = load_fastdiff(self.root, self.device, self.dtype, channels_last=True)
        cl_np = cl(PROMPT, output_type="np", **kw).images
        del cl
        fp32 = load_fastdiff(self.root, self.device, torch.float32, cuda_graphs=False)
        ref_np = fp32(PROMPT, output_type="np", **kw).images
        del fp32
        torch.cuda.empty_cache()
        self.rows["fidelity"] = {
            "psnr_fp16_graph_vs_fp32_db": psnr(fast_np, ref_np),
            "psnr_fp16_graph_channels_last_vs_fp32_db": psnr(cl_np, ref_np),
            "psnr_fp16_graph_channels_last_vs_fp16_graph_db": psnr(cl_np, fast_np),
            "rel_err_graph_vs_eager_fp16_latents": float((fast_lat.double() - eager_lat.double()).norm()
                                                         / eager_lat.double().norm()),
            "max_abs_graph_vs_eager_fp16_latents": float((fast_lat - eager_lat).abs().max()),
            "what": f"{self.size}px, {self.steps[0]} steps, euler_ancestral, CFG 7, 2 images, seed 7"}

    def peak_memory(self):
        """Each pipeline in its own process, so neither counts the other's weights."""
        row = {}
        for which in ("diffusers", "fastdiff"):
            out = subprocess.run([sys.executable, "-m", "fastdiff.bench", "--memory", which, "--root", str(self.root)]
                                 + (["--quick"] if self.tiny else []),
                                 capture_output=True, text=True, check=True)
            row[f"bytes_{which}"] = int(out.stdout.strip().splitlines()[-1])
        row["ratio_fastdiff_over_diffusers"] = row["bytes_fastdiff"] / row["bytes_diffusers"]
        self.rows["peak_memory"] = row


def memory_child(which: str, root: Path, tiny: bool) -> int:
    dtype, s, steps = torch.float16, (64 if tiny else 512), (2 if tiny else 20)
    if which == "diffusers":
        pipe = load_diffusers(root, "cuda", dtype)
        run = lambda: pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=s, width=s)  # noqa: E731
    else:
        pipe = load_fastdiff(root, "cuda", dtype)
        run = lambda: pipe(PROMPT, negative_prompt=NEGATIVE, steps=steps, width=s, height=s)  # noqa: E731
    run()  # warm: graphs captured, kernels compiled
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


# --------------------------------------------------------------------------------- report


def _git_commit():
    # FASTDIFF_COMMIT wins: a copied working tree may carry a stale .git.
    if os.environ.get("FASTDIFF_COMMIT"):
        return os.environ["FASTDIFF_COMMIT"]
    try:
        return subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def environment() -> dict:
    import diffusers
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or platform.machine()})",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "git_commit": _git_commit(),
    }


def write_results(rows: dict, tiny: bool, out_dir: Path | None = None) -> Path:
    env = environment()
    if out_dir is None:
        out_dir = RESULTS_DIR if CUDA else Path(tempfile.mkdtemp(prefix="fastdiff-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-")
    path = out_dir / f"pipeline-{name}-{env['date']}.json"
    doc = {**env, "configuration": "reduced (tiny models, CPU)" if tiny else "SD 1.5 architecture, random weights",
           "dtype": "float16" if CUDA else "float32",
           "baseline": "diffusers StableDiffusionPipeline (SDPA attention), same weights, same dtype",
           "results": rows}
    path.write_text(json.dumps(doc, indent=2))
    return path


def print_rows(rows: dict) -> None:
    for name, row in rows.items():
        print(f"{name}:")
        for k, v in row.items():
            print(f"    {k:40s} {v:.4g}" if isinstance(v, float) else f"    {k:40s} {v}")


def run_all(tiny: bool, compile_baseline: bool, root: Path | None = None, out_dir: Path | None = None,
            skip=()) -> tuple[dict, Path]:
    root = root or Path(tempfile.mkdtemp(prefix="fastdiff-sd15-"))
    build_model_folder(root, tiny)
    b = Bench(root, tiny, compile_baseline)
    for name, fn in [("unet_step", b.unet_step), ("vae_decode", b.vae_decode), ("text_encode", b.text_encode),
                     ("image_a", lambda: b.image(b.steps[0])), ("image_b", lambda: b.image(b.steps[1])),
                     ("fidelity", b.fidelity), ("peak_memory", b.peak_memory)]:
        if name in skip or (name == "peak_memory" and not CUDA):
            continue
        t = time.perf_counter()
        fn()
        print(f"[{name}: {time.perf_counter() - t:.1f} s]", file=sys.stderr, flush=True)
    return b.rows, write_results(b.rows, tiny, out_dir)


def main(argv=None, *, out=None, quick=False, compile_baseline=False) -> int:
    for mod in ("diffusers", "transformers"):
        try:
            __import__(mod)
        except ImportError:
            print(f"fastdiff bench: error: needs {mod} (pip install 'fastdiff[bench]')", file=sys.stderr)
            return 2
    p = argparse.ArgumentParser(prog="fastdiff bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced configuration (default without CUDA)")
    p.add_argument("--compile", action="store_true", help="add torch.compile(diffusers UNet) rows")
    p.add_argument("--root", type=Path, default=None, help="model folder to build / reuse")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--skip", action="append", default=[], help="skip a row (repeatable)")
    p.add_argument("--memory", choices=["diffusers", "fastdiff"], help=argparse.SUPPRESS)
    a = p.parse_args(argv if argv is not None else (sys.argv[1:] if out is None and not quick and not compile_baseline else []))
    if out is not None:
        a.out = Path(out)
    a.quick = a.quick or quick
    a.compile = a.compile or compile_baseline
    tiny = a.quick or not CUDA
    if a.memory:
        print(memory_child(a.memory, a.root, tiny))
        return 0
    rows, path = run_all(tiny, a.compile, a.root, a.out, a.skip)
    print_rows(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
