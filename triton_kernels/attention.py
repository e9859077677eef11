"""Scaled dot-product attention, forward only: softmax(q k^T * scale) v.

Idea: FlashAttention-2 (Dao 2023, https://arxiv.org/abs/2307.08691) as in Triton's fused-attention
tutorial: one program owns BLOCK_M query rows of one (batch, head), streams the keys and values
in BLOCK_N blocks and keeps an online softmax (running max m, running sum l, rescaled fp32
accumulator), so the [Lq, Lk] score matrix never exists in memory. exp2 with log2(e) folded
into the scale saves a multiply per score.

Fits Stable Diffusion: q, k, v are read through their strides, so the [B, L, H*D] projection
outputs viewed as [B, L, H, D].transpose(1, 2) need no copy; the output is written into a
contiguous [B, Lq, H, D] buffer whose transpose(1, 2) view is returned, so the caller's
reshape back to [B, Lq, H*D] is free. Any Lq, Lk (cross-attention has Lk = 77, 154, 231: the
last key block is masked); head dims are padded to a power of two (40 -> 64, 80 -> 128,
160 -> 256) and masked.

Not supported: head dims above 256 (the VAE's single 512-wide head: ops falls back), masks,
causal attention, dropout, backward, q/k/v of different dtypes, fp8.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention_ref(q, k, v, scale=None):
    """float64 reference: the definition, materialising the score matrix."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v64)


def _configs():
    if INTERPRET:
        # The interpreter runs each program in numpy: few, large blocks are fastest.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    cfgs = []
    for bm, bn, warps, stages in [
        (128, 128, 8, 3),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 2),
        (32, 32, 4, 1),  # always fits, even at BLOCK_D = 256 in fp32
        # The H100 sweep's fastest at L = 4096, D = 40 (0.300 and 0.308 ms against 0.330-0.44 for
        # the above; SDPA 0.164): benchmarks/results/sweep-NVIDIA-H100-80GB-HBM3-2026-11-24-4132486.json
        (256, 64, 8, 3),
        (128, 32, 8, 3),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return cfgs


def _prune(configs, named_args, **kwargs):
    # Rough shared-memory need (pipelined key tiles plus the q tile; measured Triton 3.6 sm_90
    # fp16 use is close to it, fp32 uses more); configs that still do
    # not fit raise OutOfResources, which the autotuner skips, but compiling them costs time.
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    elt = named_args["q"].element_size()

    def smem(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return max(1, c.num_stages) * bn * bd * elt + bm * bd * elt

    keep = [c for c in configs if smem(c) <= 200 * 1024]
    return keep or [min(configs, key=smem)]


@triton.jit
def _attn_block(acc, l_i, m_i, qt, k_ptrs, v_ptrs, start_n, skn, svn, Lk, qk_scale, offs_n, mask_d,
                BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr):
    """One key/value block of the online softmax; MASK_N only for the last, partial block."""
    if MASK_N:
        mask_n = (start_n + offs_n) < Lk
        kt = tl.load(k_ptrs + start_n * skn, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    elif EVEN_D:
        kt = tl.load(k_ptrs + start_n * skn)
    else:
        kt = tl.load(k_ptrs + start_n * skn, mask=mask_d[:, None], other=0.0)
    if IEEE:
        s = tl.dot(qt, kt, input_precision="ieee")
    else:
        s = tl.dot(qt, kt)
    s = s * qk_scale
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    # Every key block holds at least one valid key, so m_new is finite after block one.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASK_N:
        vt = tl.load(v_ptrs + start_n * svn, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    elif EVEN_D:
        vt = tl.load(v_ptrs + start_n * svn)
    else:
        vt = tl.load(v_ptrs + start_n * svn, mask=mask_d[None, :], other=0.0)
    if IEEE:
        acc += tl.dot(p, vt, input_precision="ieee")
    else:
        acc += tl.dot(p.to(vt.dtype), vt)
    return acc, l_i, m_new


@triton.autotune(
    configs=_configs(),
    key=["Lq", "Lk", "BLOCK_D", "IEEE"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune},
)
@triton.jit
def _attn_fwd(
    q, k, v, o,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    H, Lq, Lk, D,
    qk_scale,  # scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,  # D == BLOCK_D: no head-dim mask on the key/value loads
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_m = offs_m < Lq

    q_ptrs = q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    qt = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    # k is loaded transposed, [BLOCK_D, BLOCK_N], so that q @ k needs no in-register transpose.
    k_ptrs = k + b * skb + h * skh + offs_d[:, None] * skd + offs_n[None, :] * skn
    v_ptrs = v + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Full key blocks need no key mask (self-attention: all of them); only a partial last block
    # (cross-attention, Lk = 77k) is masked.
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, qt, k_ptrs, v_ptrs, start_n, skn, svn, Lk, qk_scale,
                                    offs_n, mask_d, BLOCK_N, False, EVEN_D, IEEE)
    if n_full < Lk:
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, qt, k_ptrs, v_ptrs, n_full, skn, svn, Lk, qk_scale,
                                    offs_n, mask_d, BLOCK_N, True, EVEN_D, IEEE)

    acc = acc / l_i[:, None]
    o_ptrs = o + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    tl.store(o_ptrs, acc.to(o.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def unsupported(q, k, v) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"needs 4-D q/k/v, got {q.dim()}/{k.dim()}/{v.dim()}-D"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} not in {DTYPES}"
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[-1] != D or v.shape[-1] != D \
            or k.shape[2] != v.shape[2]:
        return f"shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} (needs v dim == q dim)"
    if D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM}"
    if Lq == 0 or k.shape[2] == 0 or B * H == 0:
        return "empty input"
    if B * H > 65535:
        return f"B * H = {B * H} exceeds the grid's second dimension (65535)"
    return None


def attention(q, k, v, scale=None, out=None):
    """q [B, H, Lq, D], k/v [B, H, Lk, D], any strides -> [B, H, Lq, D], a transposed view of a
    contiguous [B, Lq, H, D] buffer (``out`` if given, which must be exactly that buffer)."""
    why = unsupported(q, k, v)
    if why:
        raise ValueError(f"attention kernel: {why}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if out is None:
        out = torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype)
    elif out.shape != (B, Lq, H, D) or not out.is_contiguous() or out.dtype != q.dtype:
        raise ValueError(f"attention: out must be a contiguous {(B, Lq, H, D)} {q.dtype} tensor")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_d = max(16, triton.next_power_of_2(D))
    o = out.transpose(1, 2)  # [B, H, Lq, D] view
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](
        q, k, v, o,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, Lq, Lk, D,
        scale * 1.4426950408889634,
        BLOCK_D=block_d, EVEN_D=D == block_d, IEEE=q.dtype == torch.float32,
    )
    return o
