"""Fused sampler update: out = sum_i c_i * t_i over up to 5 same-shaped tensors in one pass
(e.g. DPM-Solver++(2M): x' = a * x + b * denoised + c * old_denoised, plus a noise term for
the ancestral / SDE samplers).

Idea: a multi-operand axpy. torch needs one kernel and one full read/write of the latent per
term; here every input is read once and the output written once, accumulating in fp32.
The coefficients are either Python floats (kernel arguments) or a 1-D float32 tensor on the
tensors' device that the kernel reads, so a captured CUDA graph can be replayed with new
coefficients by writing that tensor, without re-capture.

``out`` may alias one of the inputs (in-place update): each element is read before it is
written by the same program. Not supported: more than 5 terms, mixed shapes / dtypes,
non-contiguous tensors (ops falls back), broadcasting.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TERMS = 5


def lincomb_ref(coeffs, tensors):
    """float64 reference."""
    return sum(float(c) * t.double() for c, t in zip(coeffs, tensors))


@triton.jit
def _lincomb(
    o, t0, t1, t2, t3, t4, c0, c1, c2, c3, c4, cp, numel,
    N: tl.constexpr, COEF_PTR: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if COEF_PTR:
        k0 = tl.load(cp)
    else:
        k0 = c0
    acc = tl.load(t0 + offs, mask=mask, other=0.0).to(tl.float32) * k0
    if N > 1:
        if COEF_PTR:
            k1 = tl.load(cp + 1)
        else:
            k1 = c1
        acc += tl.load(t1 + offs, mask=mask, other=0.0).to(tl.float32) * k1
    if N > 2:
        if COEF_PTR:
            k2 = tl.load(cp + 2)
        else:
            k2 = c2
        acc += tl.load(t2 + offs, mask=mask, other=0.0).to(tl.float32) * k2
    if N > 3:
        if COEF_PTR:
            k3 = tl.load(cp + 3)
        else:
            k3 = c3
        acc += tl.load(t3 + offs, mask=mask, other=0.0).to(tl.float32) * k3
    if N > 4:
        if COEF_PTR:
            k4 = tl.load(cp + 4)
        else:
            k4 = c4
        acc += tl.load(t4 + offs, mask=mask, other=0.0).to(tl.float32) * k4
    tl.store(o + offs, acc.to(o.dtype.element_ty), mask=mask)


def unsupported(coeffs, tensors) -> str | None:
    n = len(tensors)
    if not 1 <= n <= MAX_TERMS:
        return f"{n} terms (1 to {MAX_TERMS} supported)"
    t0 = tensors[0]
    if t0.dtype not in DTYPES:
        return f"dtype {t0.dtype} not in {DTYPES}"
    for t in tensors:
        if t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device:
            return "tensors differ in shape, dtype or device"
        if not t.is_contiguous():
            return "non-contiguous tensor"
    if isinstance(coeffs, torch.Tensor):
        if coeffs.dtype != torch.float32 or coeffs.dim() != 1 or coeffs.device != t0.device \
                or not coeffs.is_contiguous():
            return "coefficient tensor must be a contiguous 1-D float32 tensor on the tensors' device"
        if coeffs.shape[0] < n:
            return f"{coeffs.shape[0]} coefficients for {n} tensors"
    elif len(coeffs) != n:
        return f"{len(coeffs)} coefficients for {n} tensors"
    return None


def lincomb(coeffs, tensors, out=None):
    """sum_i coeffs[i] * tensors[i]; coeffs: floats or a 1-D float32 device tensor."""
    why = unsupported(coeffs, tensors)
    if why:
        raise ValueError(f"lincomb kernel: {why}")
    t0 = tensors[0]
    if out is None:
        out = torch.empty_like(t0)
    elif out.shape != t0.shape or out.dtype != t0.dtype or not out.is_contiguous():
        raise ValueError("lincomb: out must be a contiguous tensor of the inputs' shape and dtype")
    n = len(tensors)
    ts = list(tensors) + [t0] * (MAX_TERMS - n)
    if isinstance(coeffs, torch.Tensor):
        cs, cp, from_ptr = [0.0] * MAX_TERMS, coeffs, True
    else:
        cs, cp, from_ptr = [float(c) for c in coeffs] + [0.0] * (MAX_TERMS - n), t0, False
    numel = t0.numel()
    block = 1024
    _lincomb[(max(1, triton.cdiv(numel, block)),)](
        out, *ts, *cs, cp, numel, N=n, COEF_PTR=from_ptr, BLOCK=block, num_warps=4,
    )
    return out
