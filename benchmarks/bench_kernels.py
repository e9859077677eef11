"""fastdiff's Triton kernels vs their torch counterparts at Stable Diffusion 1.5 512x512 shapes.

UNet shapes use batch 2 (classifier-free guidance doubles the batch); the VAE decoder runs
batch 1 (one image). Every number is the median of several CUDA-event timed runs after a
warm-up, reported with its throughput (TFLOP/s for attention, GB/s of minimal traffic for the
memory-bound ops) and its share of a ceiling measured on the same GPU: a large fp16 matmul
for FLOP/s, a large device-to-device copy for bandwidth.

    python benchmarks/bench_kernels.py                    # table + JSON, one shot
    pytest benchmarks/bench_kernels.py --benchmark-enable # the same cases under pytest-benchmark

Both write benchmarks/results/kernels-<device>-<date>.json. Without CUDA the pytest run skips
and the script exits with a message.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
DTYPE = torch.float16

if "pytest" in sys.modules and not CUDA:
    import pytest

    pytest.skip("kernel benchmarks need a CUDA device", allow_module_level=True)


# ---------------------------------------------------------------------------------------------
# cases: (name, kind, params)

# Self-attention per UNet level (tokens, heads, head dim) and its cross-attention (Lk = 77).
ATTN_LEVELS = [(4096, 8, 40), (1024, 8, 80), (256, 8, 160), (64, 8, 160)]

# GroupNorm inputs of the SD 1.5 UNet at 64x64 latents: (C, side, silu). ResNet norms (with
# SiLU) including the up path's concatenated skip widths; Transformer2D's norms have no SiLU.
GN_UNET = [
    (320, 64, True), (320, 32, True), (640, 32, True), (640, 16, True), (1280, 16, True),
    (1280, 8, True), (2560, 8, True), (2560, 16, True), (1920, 16, True), (1920, 32, True),
    (1280, 32, True), (960, 32, True), (960, 64, True), (640, 64, True),
    (320, 64, False), (640, 32, False), (1280, 16, False), (1280, 8, False),
]
# VAE decoder, 64x64 latents -> 512x512: (C, side, silu); the mid-block attention norm has no SiLU.
GN_VAE = [
    (512, 64, True), (512, 128, True), (512, 256, True), (256, 256, True), (256, 512, True),
    (128, 512, True), (512, 64, False),
]
LN_SHAPES = [(2 * 4096, 320), (2 * 1024, 640), (2 * 256, 1280), (2 * 64, 1280), (2 * 77, 768)]
GEGLU_SHAPES = [(2, 4096, 2 * 1280), (2, 1024, 2 * 2560), (2, 256, 2 * 5120), (2, 64, 2 * 5120)]
LINCOMB_SHAPES = [((1, 4, 64, 64), 3), ((1, 4, 64, 64), 5), ((16, 4, 128, 128), 3)]


def cases():
    out = []
    for L, H, D in ATTN_LEVELS:
        out.append((f"attn self L={L} H={H} D={D}", "attention", dict(B=2, H=H, Lq=L, Lk=L, D=D)))
    for L, H, D in ATTN_LEVELS:
        out.append((f"attn cross Lq={L} Lk=77 H={H} D={D}", "attention", dict(B=2, H=H, Lq=L, Lk=77, D=D)))
    for C, s, silu in GN_UNET:
        out.append((f"gn unet C={C} {s}x{s}{' +silu' if silu else ''}", "group_norm",
                    dict(B=2, C=C, side=s, silu=silu, eps=1e-5 if silu else 1e-6)))
    for C, s, silu in GN_VAE:
        out.append((f"gn vae C={C} {s}x{s}{' +silu' if silu else ''}", "group_norm",
                    dict(B=1, C=C, side=s, silu=silu, eps=1e-6)))
    for M, N in LN_SHAPES:
        out.append((f"layernorm {M}x{N}", "layer_norm", dict(M=M, N=N)))
    for shape in GEGLU_SHAPES:
        out.append((f"geglu {'x'.join(map(str, shape))}", "geglu", dict(shape=shape)))
    for shape, n in LINCOMB_SHAPES:
        out.append((f"lincomb n={n} {'x'.join(map(str, shape))}", "lincomb", dict(shape=shape, n=n)))
    return out


def build(kind, p, device="cuda"):
    """-> (ours, theirs, work, unit) where work is FLOPs ('TFLOP/s') or bytes ('GB/s')."""
    from fastdiff.triton_kernels import attention as attn_k
    from fastdiff.triton_kernels import geglu as geglu_k
    from fastdiff.triton_kernels import group_norm as gn_k
    from fastdiff.triton_kernels import layer_norm as ln_k
    from fastdiff.triton_kernels import lincomb as lc_k

    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device=device, dtype=DTYPE, generator=g)

    elt = torch.finfo(DTYPE).bits // 8
    if kind == "attention":
        B, H, Lq, Lk, D = p["B"], p["H"], p["Lq"], p["Lk"], p["D"]
        # the projections' layout: [B, L, H*D] viewed as [B, H, L, D]
        q = r(B, Lq, H * D).view(B, Lq, H, D).transpose(1, 2)
        kv = r(B, Lk, 2 * H * D)
        k = kv[..., : H * D].view(B, Lk, H, D).transpose(1, 2)
        v = kv[..., H * D :].view(B, Lk, H, D).transpose(1, 2)
        out = torch.empty(B, Lq, H, D, device=device, dtype=DTYPE)
        ours = lambda: attn_k.attention(q, k, v, out=out)  # noqa: E731
        # torch gets the same strided views; its result needs the same transpose back
        theirs = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        return ours, theirs, 4.0 * B * H * Lq * Lk * D, "TFLOP/s"
    if kind == "group_norm":
        B, C, s = p["B"], p["C"], p["side"]
        x, w, b = r(B, C, s, s), r(C), r(C)
        silu, eps = p["silu"], p["eps"]
        ours = lambda: gn_k.group_norm(x, 32, w, b, eps, silu=silu)  # noqa: E731
        if silu:
            theirs = lambda: F.silu(F.group_norm(x, 32, w, b, eps))  # noqa: E731
        else:
            theirs = lambda: F.group_norm(x, 32, w, b, eps)  # noqa: E731
        return ours, theirs, 2.0 * x.numel() * elt, "GB/s"
    if kind == "layer_norm":
        x, w, b = r(p["M"], p["N"]), r(p["N"]), r(p["N"])
        ours = lambda: ln_k.layer_norm(x, w, b, 1e-5)  # noqa: E731
        theirs = lambda: F.layer_norm(x, (p["N"],), w, b, 1e-5)  # noqa: E731
        return ours, theirs, 2.0 * x.numel() * elt, "GB/s"
    if kind == "geglu":
        x = r(*p["shape"])

        def theirs():
            h, gate = x.chunk(2, dim=-1)
            return h * F.gelu(gate)

        return (lambda: geglu_k.geglu(x)), theirs, 1.5 * x.numel() * elt, "GB/s"
    if kind == "lincomb":
        ts = [r(*p["shape"]) for _ in range(p["n"])]
        cs = [0.9, -0.3, 0.2, 0.05, 0.01][: p["n"]]
        coeffs = torch.tensor(cs, device=device, dtype=torch.float32)

        def theirs():
            acc = ts[0] * cs[0]
            for c, t in zip(cs[1:], ts[1:]):
                acc = acc + t * c
            return acc

        ours = lambda: lc_k.lincomb(coeffs, ts)  # noqa: E731
        return ours, theirs, (p["n"] + 1.0) * ts[0].numel() * elt, "GB/s"
    raise KeyError(kind)


# ---------------------------------------------------------------------------------------------
# timing


def cuda_time_ms(fn, warmup=10, reps=7, min_ms=20.0):
    """Median milliseconds per call: warm up, synchronize, then CUDA-event timed batches."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    iters = max(1, min(1000, int(math.ceil(min_ms / max(start.elapsed_time(end), 1e-3)))))
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def graph_time_ms(fn, calls=20, reps=7):
    """Median milliseconds per call with `calls` calls captured in one CUDA graph: the device
    time alone, no Python or launch overhead — how the pipeline runs every kernel."""
    fn()  # compile and autotune outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


_CEILINGS = {}


def ceilings():
    """Measured on this GPU: D2D copy bandwidth (GB/s) and fp16 matmul throughput (TFLOP/s)."""
    if not _CEILINGS:
        n = 1 << 28  # 512 MiB of fp16 each way
        src = torch.empty(n, device="cuda", dtype=torch.float16).normal_()
        dst = torch.empty_like(src)
        ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=5)
        _CEILINGS["copy_GBps"] = 2 * n * 2 / ms / 1e6
        del src, dst
        m = 8192
        a = torch.randn(m, m, device="cuda", dtype=torch.float16)
        bm = torch.randn(m, m, device="cuda", dtype=torch.float16)
        ms = cuda_time_ms(lambda: a @ bm, warmup=3, reps=5)
        _CEILINGS["matmul_fp16_TFLOPs"] = 2 * m**3 / ms / 1e9
        del a, bm
        torch.cuda.empty_cache()
    return _CEILINGS


def rel_err(ours, theirs):
    o, t = ours.double(), theirs.double()
    return ((o - t).norm() / t.norm()).item()


def run_case(name, kind, p, device="cuda"):
    ours, theirs, work, unit = build(kind, p, device)
    err = rel_err(ours(), theirs())
    # Graph-replayed device time is the headline (the pipeline replays every kernel from a
    # CUDA graph); eager per-call time, launch overhead included, is kept beside it.
    ms_ours = graph_time_ms(ours)
    ms_theirs = graph_time_ms(theirs)
    ms_ours_eager = cuda_time_ms(ours)
    ms_theirs_eager = cuda_time_ms(theirs)
    torch.cuda.empty_cache()
    ceil = ceilings()
    cap = ceil["matmul_fp16_TFLOPs"] if unit == "TFLOP/s" else ceil["copy_GBps"]
    scale = 1e9 if unit == "TFLOP/s" else 1e6  # work / ms -> TFLOP/s or GB/s
    rate_ours, rate_theirs = work / ms_ours / scale, work / ms_theirs / scale
    return {
        "name": name, "kind": kind, "params": p, "dtype": str(DTYPE).split(".")[-1],
        "ms_fastdiff": ms_ours, "ms_torch": ms_theirs, "speedup": ms_theirs / ms_ours,
        "ms_fastdiff_eager": ms_ours_eager, "ms_torch_eager": ms_theirs_eager,
        "speedup_eager": ms_theirs_eager / ms_ours_eager,
        "unit": unit, "rate_fastdiff": rate_ours, "rate_torch": rate_theirs,
        "share_of_ceiling_fastdiff": rate_ours / cap, "share_of_ceiling_torch": rate_theirs / cap,
        "rel_err_vs_torch": err,
    }


# ---------------------------------------------------------------------------------------------
# report


from fastdiff.bench import _git_commit  # noqa: E402  (FASTDIFF_COMMIT, else git)


def write_results(rows):
    import triton

    dev = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"kernels-{re.sub(r'[^A-Za-z0-9]+', '-', dev).strip('-')}-{date}.json"
    doc = {
        "device": dev, "date": date, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": _git_commit(),
        "ceilings": ceilings(),
        "notes": "UNet shapes batch 2 (CFG), VAE decoder batch 1, fp16. ms_* = device time per call, "
                 "20 calls replayed from one CUDA graph (how the pipeline runs them); ms_*_eager = per "
                 "Python call, launch overhead included. Rates use minimal traffic (each input read "
                 "once, output written once) or 4*B*H*Lq*Lk*D attention FLOPs.",
        "results": rows,
    }
    path.write_text(json.dumps(doc, indent=2))
    return path


def print_table(rows):
    print("graphed = device time per call replayed from a CUDA graph; eager = per Python call")
    print(f"{'case':40s} {'ours ms':>8s} {'torch ms':>8s} {'x':>6s} {'rate':>16s} {'of ceil':>7s} "
          f"{'eager x':>7s} {'err':>8s}")
    for r in rows:
        rate = f"{r['rate_fastdiff']:.1f} {r['unit']}"
        print(f"{r['name']:40s} {r['ms_fastdiff']:8.4f} {r['ms_torch']:8.4f} {r['speedup']:6.2f} "
              f"{rate:>16s} {100 * r['share_of_ceiling_fastdiff']:6.1f}% {r['speedup_eager']:7.2f} "
              f"{r['rel_err_vs_torch']:8.1e}")


# ---------------------------------------------------------------------------------------------
# pytest-benchmark face

_ROWS = []
_CASES = cases()


def _pytest_api():
    import pytest

    @pytest.fixture(scope="module", autouse=True)
    def _write_json():
        yield
        if _ROWS:
            print(f"\nwrote {write_results(_ROWS)}")

    @pytest.mark.parametrize("name,kind,p", _CASES, ids=[c[0].replace(" ", "_") for c in _CASES])
    def test_kernel_vs_torch(benchmark, name, kind, p):
        row = run_case(name, kind, p)
        _ROWS.append(row)
        benchmark.extra_info.update(row)
        tol = 2e-3 if kind != "attention" else 5e-3  # vs torch's own fp16 result, not fp64
        assert row["rel_err_vs_torch"] <= tol, row
        ours = build(kind, p)[0]

        def timed():
            ours()
            torch.cuda.synchronize()

        benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=3)

    return _write_json, test_kernel_vs_torch


if "pytest" in sys.modules and CUDA:
    _write_json, test_kernel_vs_torch = _pytest_api()


def main():
    if not CUDA:
        print("bench_kernels: skipped, no CUDA device", file=sys.stderr)
        return 0
    os.environ.setdefault("FASTDIFF_OPS", "auto")
    rows = []
    for name, kind, p in _CASES:
        rows.append(run_case(name, kind, p))
    ceil = ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {ceil['copy_GBps']:.0f} GB/s, "
          f"fp16 matmul {ceil['matmul_fp16_TFLOPs']:.0f} TFLOP/s")
    print_table(rows)
    print(f"wrote {write_results(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
