"""Launch-parameter sweeps for the Triton kernels at the SD 1.5 shapes of bench_kernels.py, on
CUDA: what each kernel's defaults (and the autotuner's configs) should be, measured rather
than guessed. Every time is graph-replayed device time per call (bench_kernels.graph_time_ms),
every candidate is checked against torch before it is timed.

- group_norm: torch (group_norm + silu) vs the split path vs the one-launch group path at
  several tiles and warp counts vs the rows path (whole group in registers) where it fits;
- layer_norm: rows per program x warps;
- attention: each autotuner config on its own, and the one the autotuner picks.

    python benchmarks/sweep_kernels.py [--only gn,ln,attn]

Writes benchmarks/results/sweep-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402


def _check(ours, ref, tol=5e-3):
    err = bk.rel_err(ours, ref)
    if not err <= tol:
        raise AssertionError(f"rel err {err:.2e} > {tol}")
    return err


def sweep_group_norm(rows, save):
    from fastdiff.triton_kernels import group_norm as gn_k

    for name, kind, p in bk.cases():
        if kind != "group_norm":
            continue
        B, C, s, silu, eps = p["B"], p["C"], p["side"], p["silu"], p["eps"]
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(B, C, s, s, device="cuda", dtype=bk.DTYPE, generator=g)
        w = torch.randn(C, device="cuda", dtype=bk.DTYPE, generator=g)
        b = torch.randn(C, device="cuda", dtype=bk.DTYPE, generator=g)
        out = torch.empty_like(x)

        def torch_fn():
            y = F.group_norm(x, 32, w, b, eps)
            return F.silu(y) if silu else y

        ref = torch_fn()
        row = {"name": name, "L": C // 32 * s * s, "ms": {"torch": bk.graph_time_ms(torch_fn)}}
        cands = [("auto", dict(path="auto"), {}), ("split", dict(path="split"), {})]
        for tile in (1024, 2048, 4096, 8192):
            for warps in (4, 8):
                cands.append((f"group tile={tile} w={warps}", dict(path="group"),
                              {"GROUP_TILE": tile, "GROUP_WARPS": warps}))
        L = C // 32 * s * s
        if L <= 16384:
            nxt = 1 << (L - 1).bit_length()
            for tile in sorted({nxt, max(nxt, 4096), max(nxt, 8192)}):
                cands.append((f"rows tile={tile}", dict(path="rows"), {"ROWS_MAX": 16384, "_ROWS_TILE": tile}))
        for label, kw, attrs in cands:
            old = {k: getattr(gn_k, k) for k in attrs}
            try:
                for k, v in attrs.items():
                    setattr(gn_k, k, v)
                fn = lambda: gn_k.group_norm(x, 32, w, b, eps, silu=silu, out=out, **kw)  # noqa: E731
                _check(fn(), ref)
                row["ms"][label] = bk.graph_time_ms(fn)
            except Exception as e:  # noqa: BLE001  (a config that does not compile or fit)
                row["ms"][label] = None
                row.setdefault("errors", {})[label] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                for k, v in old.items():
                    setattr(gn_k, k, v)
        best = min((k for k in row["ms"] if k != "torch" and row["ms"][k]), key=lambda k: row["ms"][k])
        row["best"], row["speedup_best"] = best, row["ms"]["torch"] / row["ms"][best]
        row["speedup_split"] = row["ms"]["torch"] / row["ms"]["split"]
        print(f"{name:32s} L={L:7d} torch {row['ms']['torch']:.4f} split {row['ms']['split']:.4f} "
              f"best {best} {row['ms'][best]:.4f} ({row['speedup_best']:.2f}x)", flush=True)
        rows.append(row)
        save()
    return rows


def sweep_layer_norm(rows, save):
    import triton

    from fastdiff.triton_kernels import layer_norm as ln_k

    for M, N in bk.LN_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, N, device="cuda", dtype=bk.DTYPE, generator=g)
        w = torch.randn(N, device="cuda", dtype=bk.DTYPE, generator=g)
        b = torch.randn(N, device="cuda", dtype=bk.DTYPE, generator=g)
        y = torch.empty_like(x)
        ref = F.layer_norm(x, (N,), w, b, 1e-5)
        row = {"name": f"layernorm {M}x{N}",
               "ms": {"torch": bk.graph_time_ms(lambda: F.layer_norm(x, (N,), w, b, 1e-5)),
                      "default": bk.graph_time_ms(lambda: ln_k.layer_norm(x, w, b, 1e-5, out=y))}}
        block_n = triton.next_power_of_2(N)
        for r in (1, 2, 4, 8, 16):
            for warps in (1, 2, 4, 8):
                def fn(r=r, warps=warps):
                    ln_k._ln_fwd[(triton.cdiv(M, r),)](x, y, w, b, M, N, x.stride(0), y.stride(0), 1e-5,
                                                      HAS_W=True, HAS_B=True, ROWS=r, BLOCK_N=block_n,
                                                      num_warps=warps)
                    return y
                label = f"rows={r} w={warps}"
                try:
                    _check(fn(), ref)
                    row["ms"][label] = bk.graph_time_ms(fn)
                except Exception as e:  # noqa: BLE001
                    row["ms"][label] = None
                    row.setdefault("errors", {})[label] = f"{type(e).__name__}: {str(e)[:200]}"
        best = min((k for k in row["ms"] if k != "torch" and row["ms"][k]), key=lambda k: row["ms"][k])
        row["best"], row["speedup_best"] = best, row["ms"]["torch"] / row["ms"][best]
        row["speedup_default"] = row["ms"]["torch"] / row["ms"]["default"]
        print(f"{row['name']:24s} torch {row['ms']['torch']:.4f} default {row['ms']['default']:.4f} "
              f"best {best} {row['ms'][best]:.4f} ({row['speedup_best']:.2f}x)", flush=True)
        rows.append(row)
        save()
    return rows


EXTRA_ATTN = [(128, 128, 8, 4), (128, 128, 4, 3), (128, 64, 4, 4), (128, 64, 8, 4), (64, 128, 4, 3),
              (64, 64, 4, 4), (64, 64, 2, 3), (256, 64, 8, 3), (128, 32, 8, 3), (64, 32, 2, 3)]


def sweep_attention(rows, save):
    import math

    import triton

    from fastdiff.triton_kernels import attention as at_k

    base = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in at_k._configs()]
    configs = base + [c for c in EXTRA_ATTN if c not in base]
    for name, kind, p in bk.cases():
        if kind != "attention":
            continue
        ours, theirs, work, _ = bk.build(kind, p)
        ref = theirs()
        row = {"name": name, "ms": {"sdpa": bk.graph_time_ms(theirs), "autotuned": bk.graph_time_ms(ours)}}
        _check(ours(), ref)
        key_cfgs = {str(k): str(v) for k, v in getattr(at_k._attn_fwd, "cache", {}).items()}
        row["autotuner_cache"] = key_cfgs
        B, H, Lq, Lk, D = p["B"], p["H"], p["Lq"], p["Lk"], p["D"]
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, Lq, H * D, device="cuda", dtype=bk.DTYPE, generator=g).view(B, Lq, H, D).transpose(1, 2)
        kv = torch.randn(B, Lk, 2 * H * D, device="cuda", dtype=bk.DTYPE, generator=g)
        k = kv[..., : H * D].view(B, Lk, H, D).transpose(1, 2)
        v = kv[..., H * D:].view(B, Lk, H, D).transpose(1, 2)
        ref = F.scaled_dot_product_attention(q, k, v)
        out = torch.empty(B, Lq, H, D, device="cuda", dtype=bk.DTYPE)
        o = out.transpose(1, 2)
        bd = max(16, triton.next_power_of_2(D))
        for bm, bn, warps, stages in configs:
            def fn(bm=bm, bn=bn, warps=warps, stages=stages):
                at_k._attn_fwd.fn[(triton.cdiv(Lq, bm), B * H)](
                    q, k, v, o, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, Lq, Lk, D,
                    1.4426950408889634 / math.sqrt(D), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                    EVEN_D=D == bd, IEEE=False, num_warps=warps, num_stages=stages)
                return o
            label = f"{bm}x{bn} w={warps} s={stages}"
            try:
                _check(fn(), ref)
                row["ms"][label] = bk.graph_time_ms(fn)
            except Exception as e:  # noqa: BLE001
                row["ms"][label] = None
                row.setdefault("errors", {})[label] = f"{type(e).__name__}: {str(e)[:200]}"
        best = min((k for k in row["ms"] if k not in ("sdpa",) and row["ms"][k]), key=lambda k: row["ms"][k])
        row["best"], row["speedup_best"] = best, row["ms"]["sdpa"] / row["ms"][best]
        row["speedup_autotuned"] = row["ms"]["sdpa"] / row["ms"]["autotuned"]
        row["tflops_best"] = work / row["ms"][best] / 1e9
        print(f"{name:36s} sdpa {row['ms']['sdpa']:.4f} autotuned {row['ms']['autotuned']:.4f} "
              f"best {best} {row['ms'][best]:.4f} ({row['speedup_best']:.2f}x)", flush=True)
        rows.append(row)
        save()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="gn,ln,attn", help="comma-separated subset of gn, ln, attn")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_kernels: needs a CUDA device")
        return 0
    import platform

    import triton

    parts = a.only.split(",")
    doc = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "git_commit": bk._git_commit(),
           "notes": "fp16, SD 1.5 512x512 shapes (bench_kernels.py); ms = graph-replayed device time "
                    "per call (20 calls in one CUDA graph, median of 7)"}
    dev = re.sub(r"[^A-Za-z0-9]+", "-", doc["device"]).strip("-")
    path = bk.RESULTS_DIR / f"sweep-{dev}-{doc['date']}.json"
    bk.RESULTS_DIR.mkdir(parents=True, exist_ok=True)

    def save():  # after each row, so a run cut short by its time box keeps what it measured
        path.write_text(json.dumps(doc, indent=2))

    for key, fn in (("gn", sweep_group_norm), ("ln", sweep_layer_norm), ("attn", sweep_attention)):
        if key in parts:
            doc[key] = []
            fn(doc[key], save)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
