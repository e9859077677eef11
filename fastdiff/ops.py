"""The op table: the only place in fastdiff that knows Triton kernels exist.

Each op has a torch implementation (``*_torch``: used on CPU and as the fallback) and, where
``KERNELS`` names one, a Triton kernel module (used on CUDA) whose fp64 oracle ``*_ref`` sits
beside it. ``FASTDIFF_OPS`` forces a path for testing:

- ``auto`` (default): Triton on CUDA tensors, torch elsewhere.
- ``torch``: always torch.
- ``triton``: always the kernel; on CPU tensors this needs ``TRITON_INTERPRET=1`` set before
  the kernels are imported.

When a kernel cannot take an input (dtype, device, shape) the op falls back to torch and logs
the reason at DEBUG level on the ``fastdiff.ops`` logger; it never returns a silently wrong
answer.

The table (``KERNELS``):

    op           Triton kernel module                 torch
    attention    fastdiff.triton_kernels.attention    attention_torch
    group_norm   fastdiff.triton_kernels.group_norm   group_norm_torch
    layer_norm   fastdiff.triton_kernels.layer_norm   layer_norm_torch
    geglu        fastdiff.triton_kernels.geglu        geglu_torch
    lincomb      fastdiff.triton_kernels.lincomb      lincomb_torch
    linear_rows  none (a torch op on every device)

Each kernel module provides ``unsupported(*args) -> reason | None``, the kernel entry point
named as the op, ``INTERPRET`` and the oracle ``<op>_ref``.

Shapes:
- ``attention(q, k, v, scale=None, out=None)``: q [B, H, Lq, D], k and v [B, H, Lk, D], any strides
  (so ``x.view(B, L, H, D).transpose(1, 2)`` of a projection needs no copy) -> [B, H, Lq, D].
  The result may be a transposed view of a contiguous [B, Lq, H, D] buffer, so
  ``out.transpose(1, 2).reshape(B, Lq, H * D)`` is free.
- ``group_norm(x, num_groups, weight, bias, eps, silu=False)``: x [B, C, *spatial].
- ``layer_norm(x, weight, bias, eps)``: normalises the last dim.
- ``geglu(x)``: x [..., 2d] -> hidden * gelu(gate) [..., d], ``hidden, gate = x.chunk(2, -1)``.
- ``linear_rows(x, weight, bias)``: x [B, in] -> [B, out], each row's value independent of B.
- ``lincomb(coeffs, tensors, out=None)``: sum of c_i * t_i over up to 4 (+1 noise) same-shaped
  tensors; coeffs are floats or a 1-D float32 device tensor (CUDA-graph friendly).
"""
from __future__ import annotations

import importlib
import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("fastdiff.ops")

_MODES = ("auto", "torch", "triton")


def mode() -> str:
    """The op path forced by ``FASTDIFF_OPS`` (read on each call, so tests can switch it)."""
    m = os.environ.get("FASTDIFF_OPS", "auto").lower()
    if m not in _MODES:
        raise ValueError(f"FASTDIFF_OPS={m!r} is not one of {', '.join(_MODES)}")
    return m


# Op name -> the Triton kernel module that implements it (the repository's triton_kernels/,
# installed as fastdiff.triton_kernels).
KERNELS = {
    "attention": "fastdiff.triton_kernels.attention",
    "group_norm": "fastdiff.triton_kernels.group_norm",
    "layer_norm": "fastdiff.triton_kernels.layer_norm",
    "geglu": "fastdiff.triton_kernels.geglu",
    "lincomb": "fastdiff.triton_kernels.lincomb",
}


# ---------------------------------------------------------------------------------------------
# torch implementations


def attention_torch(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def group_norm_torch(x, num_groups, weight, bias, eps=1e-5, silu=False):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def layer_norm_torch(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def geglu_torch(x):
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def lincomb_torch(coeffs, tensors):
    out = tensors[0] * coeffs[0]
    for c, t in zip(coeffs[1:], tensors[1:]):
        out = out + t * c
    return out


# ---------------------------------------------------------------------------------------------
# dispatch


def _fallback(op: str, why: str) -> None:
    log.debug("%s: using torch, not the Triton kernel: %s", op, why)


def _kernel(op: str, *tensors):
    """The kernel module to run ``op`` on these tensors, or None for the torch implementation."""
    m = mode()
    if m == "torch":
        return None
    on_cuda = [t.is_cuda for t in tensors]
    if m == "auto" and not all(on_cuda):
        return None
    if any(on_cuda) and not all(on_cuda):
        _fallback(op, "tensors on mixed devices")
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        _fallback(op, "autograd: the kernels are forward-only")
        return None
    if not all(on_cuda) and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"FASTDIFF_OPS=triton on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            f"before fastdiff's kernels are first imported ({op})"
        )
    try:
        mod = importlib.import_module(KERNELS[op])
    except Exception as e:  # no triton, or a triton that cannot build this kernel
        if m == "triton":
            raise RuntimeError(f"FASTDIFF_OPS=triton but the {op} kernel cannot be imported: {e}") from e
        _fallback(op, f"kernel import failed: {e!r}")
        return None
    if not all(on_cuda) and not mod.INTERPRET:
        raise RuntimeError(
            f"FASTDIFF_OPS=triton on CPU tensors: the {op} kernel was imported before TRITON_INTERPRET=1 "
            "was set, so it cannot run in the interpreter"
        )
    return mod


def attention(q, k, v, scale=None, out=None):
    """softmax(q k^T * scale) v; q [B, H, Lq, D], k/v [B, H, Lk, D] -> [B, H, Lq, D].

    ``out``, if given, is a contiguous [B, Lq, H, D] buffer; the result is its transpose(1, 2)."""
    kern = _kernel("attention", q, k, v)
    if kern is not None:
        why = kern.unsupported(q, k, v)
        if why is None:
            return kern.attention(q, k, v, scale, out=out)
        _fallback("attention", why)
    y = attention_torch(q, k, v, scale)
    if out is None:
        return y
    o = out.transpose(1, 2)
    o.copy_(y)
    return o


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False):
    kern = _kernel("group_norm", *[t for t in (x, weight, bias) if t is not None])
    if kern is not None:
        why = kern.unsupported(x, num_groups, weight, bias)
        if why is None:
            return kern.group_norm(x, num_groups, weight, bias, eps, silu)
        _fallback("group_norm", why)
    return group_norm_torch(x, num_groups, weight, bias, eps, silu)


def layer_norm(x, weight, bias, eps=1e-5):
    kern = _kernel("layer_norm", *[t for t in (x, weight, bias) if t is not None])
    if kern is not None:
        why = kern.unsupported(x, weight, bias)
        if why is None:
            return kern.layer_norm(x, weight, bias, eps)
        _fallback("layer_norm", why)
    return layer_norm_torch(x, weight, bias, eps)


def geglu(x):
    if x.shape[-1] % 2:
        raise ValueError(f"geglu: last dim {x.shape[-1]} is odd; it must hold [hidden, gate] halves")
    kern = _kernel("geglu", x)
    if kern is not None:
        why = kern.unsupported(x)
        if why is None:
            return kern.geglu(x)
        _fallback("geglu", why)
    return geglu_torch(x)


def linear_rows(x, weight, bias=None):
    """F.linear for a few rows (the time embedding, [B, in] -> [B, out]) whose values must not
    depend on B: CPU GEMM libraries pick a different kernel, and so a different summation order,
    for each small row count, so an image's result would depend on what else shares its batch.
    On the CPU each row is its own 1-row product of one batched call; CUDA uses F.linear (its
    batch invariance is within fp16 tolerance, and M = B rows is noise next to the UNet)."""
    if x.is_cuda or x.ndim != 2:
        return F.linear(x, weight, bias)
    B = x.shape[0]
    wt = weight.t().expand(B, *weight.t().shape)  # [B, in, out], no copy
    if bias is None:
        return torch.bmm(x.unsqueeze(1), wt).squeeze(1)
    return torch.baddbmm(bias.expand(B, 1, bias.shape[0]), x.unsqueeze(1), wt).squeeze(1)


def lincomb(coeffs, tensors, out=None):
    """sum_i coeffs[i] * tensors[i] over up to 5 tensors.

    ``coeffs``: Python floats, or a 1-D float32 tensor on the tensors' device (read by the
    kernel at run time, so CUDA-graph replays can change it). ``out`` may alias an input."""
    n_coeffs = coeffs.shape[0] if isinstance(coeffs, torch.Tensor) else len(coeffs)
    if n_coeffs < len(tensors) or (not isinstance(coeffs, torch.Tensor) and n_coeffs != len(tensors)):
        raise ValueError(f"lincomb: {n_coeffs} coefficients for {len(tensors)} tensors")
    kern = _kernel("lincomb", *tensors)
    if kern is not None:
        why = kern.unsupported(coeffs, tensors)
        if why is None:
            return kern.lincomb(coeffs, tensors, out=out)
        _fallback("lincomb", why)
    y = lincomb_torch(coeffs, tensors)
    if out is None:
        return y
    return out.copy_(y)
