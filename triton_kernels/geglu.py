"""GEGLU (Shazeer 2020, https://arxiv.org/abs/2002.05202) as in diffusers' transformer blocks:
x [..., 2d] -> hidden * gelu(gate), with ``hidden, gate = x.chunk(2, -1)`` and exact (erf) GELU.

Idea: a plain fused elementwise kernel: each output element reads its hidden and gate values
from the two halves of the projection's output row, so neither chunk is copied and gelu(gate)
is never written out; maths in fp32, result in x's dtype.

Not supported: the tanh GELU approximation, fp64 / integer inputs, backward.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def geglu_ref(x):
    """float64 reference."""
    hidden, gate = x.double().chunk(2, dim=-1)
    return hidden * 0.5 * gate * (1.0 + torch.erf(gate / 2.0**0.5))


@triton.jit
def _geglu_fwd(x, y, n_out, D, sxm, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_out
    row = offs // D
    col = offs % D
    src = x + row * sxm + col
    h = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(src + D, mask=mask, other=0.0).to(tl.float32)
    out = h * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))
    tl.store(y + offs, out.to(y.dtype.element_ty), mask=mask)


def unsupported(x) -> str | None:
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} not in {DTYPES}"
    if x.dim() < 1 or x.numel() == 0:
        return "empty input"
    if x.shape[-1] % 2:
        return f"last dim {x.shape[-1]} is odd"
    return None


def geglu(x, out=None):
    """x [..., 2d] -> contiguous [..., d]."""
    why = unsupported(x)
    if why:
        raise ValueError(f"geglu kernel: {why}")
    D = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    shape = x.shape[:-1] + (D,)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=x.dtype)
    elif out.shape != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"geglu: out must be a contiguous {tuple(shape)} {x.dtype} tensor")
    n_out = out.numel()
    block = 1024
    _geglu_fwd[(triton.cdiv(n_out, block),)](x2, out, n_out, D, x2.stride(0), BLOCK=block, num_warps=4)
    return out
