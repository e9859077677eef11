"""LayerNorm over the last dim with affine weight and bias (CLIP and the UNet's transformer
blocks: N = 320 ... 1280).

Idea: Triton's layer-norm tutorial, forward part: a row fits in registers, so each program
loads a [ROWS, BLOCK_N] tile once, takes the mean, then the variance about that mean (a
centred second pass over registers, not E[x^2] - E[x]^2), all in fp32 on x minus the row's
first element (so a large mean costs no precision), and writes
(x - mean) * rstd * w + b in the input's dtype. Several rows per program keep small rows from
wasting the GPU on launch overhead.

Not supported: rows longer than MAX_N (ops falls back), normalising over more than the last
dim, fp64 / integer inputs, backward.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_N = 16384


def layer_norm_ref(x, weight, bias, eps=1e-5):
    """float64 reference."""
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


@triton.jit
def _ln_fwd(
    x, y, w, b, M, N, sxm, sym, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask_c = cols < N
    mask = (rows < M)[:, None] & mask_c[None, :]
    v = tl.load(x + rows[:, None] * sxm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # Shift by the row's first element so that a large mean does not swamp the fp32 sum.
    pivot = tl.load(x + rows * sxm, mask=rows < M, other=0.0).to(tl.float32)
    v = tl.where(mask, v - pivot[:, None], 0.0)
    mean = tl.sum(v, 1) / N
    d = tl.where(mask, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / N + eps)
    out = d * rstd[:, None]
    if HAS_W:
        out = out * tl.load(w + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        out = out + tl.load(b + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(y + rows[:, None] * sym + cols[None, :], out.to(y.dtype.element_ty), mask=mask)


def unsupported(x, weight, bias) -> str | None:
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} not in {DTYPES}"
    if x.dim() < 1 or x.numel() == 0:
        return "empty input"
    N = x.shape[-1]
    if N > MAX_N:
        return f"row length {N} > {MAX_N}"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (N,) or t.device != x.device):
            return f"{name} must be [{N}] on {x.device}"
    return None


def _launch(M, block_n):
    """(rows per program, warps) on a GPU. From the H100 sweep (fp16, SD 1.5 shapes;
    benchmarks/results/sweep-NVIDIA-H100-80GB-HBM3-2026-11-24-4132486.json): up to 2048 values
    per program, but one row per program until there are 512 rows per extra row, so that a
    short input (154 x 768: 154 programs) still spreads over the SMs; 8 warps on one long row,
    one warp per 1024 values when a program holds several. Best or within 0.1 us of the best
    of 20 (rows x warps) at all five shapes, where the old 4096 values and 4-8 warps were
    0.1-0.4 us slower (154 x 768: 0.0025 -> 0.0021 ms, torch 0.0037)."""
    rows = max(1, min(16, 2048 // block_n, M // 512))
    rows = 1 << (rows.bit_length() - 1)  # a power of two for tl.arange
    if rows == 1:
        return 1, max(1, min(8, block_n // 128))
    return rows, max(1, min(8, rows * block_n // 1024))


def layer_norm(x, weight, bias, eps=1e-5, out=None):
    """LayerNorm of x [..., N] over N -> contiguous [..., N] in x's dtype."""
    why = unsupported(x, weight, bias)
    if why:
        raise ValueError(f"layer_norm kernel: {why}")
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("layer_norm: out must be a contiguous tensor of x's shape and dtype")
    y2 = out.view(-1, N)
    block_n = triton.next_power_of_2(N)
    if INTERPRET:  # the interpreter pays per program, not per register: up to 64K values each
        rows = max(1, 65536 // block_n)
        warps = 4 if block_n * rows <= 4096 else 8
    else:
        rows, warps = _launch(M, block_n)
    _ln_fwd[(triton.cdiv(M, rows),)](
        x2, y2, weight if weight is not None else x2, bias if bias is not None else x2,
        M, N, x2.stride(0), y2.stride(0), float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None,
        ROWS=rows, BLOCK_N=block_n, num_warps=warps,
    )
    return out
