"""GroupNorm over [B, C, *spatial], optionally fused with the SiLU that follows it in every
Stable Diffusion ResNet block.

Idea: a split reduction in two launches, so that a group of 10 channels x 4096 pixels (the
UNet at 64x64) or 4 channels x 262144 pixels (the VAE at 512x512) still fills the GPU:
1. ``_gn_stats``: grid (B * G, S); each program reduces one slice of one group to
   (count, mean, M2). Every tile's moments are taken about the tile's own mean (a centred
   second pass over registers), and tiles and slices are merged with Chan et al.'s parallel
   variance formula, so no E[x^2] - E[x]^2 cancellation anywhere; all in fp32, on x minus
   the group's first element, so that a large mean does not cost the sums their precision.
2. ``_gn_apply``: grid (B * G, S); each program merges its group's S partials (Chan again,
   vectorised), folds mean/rstd/weight/bias into a per-channel scale and shift, and writes
   y = x * a + b (then y * sigmoid(y) when SiLU is fused) in the input's dtype.
Channels per group need not be a power of two (320 / 32 = 10): the channel block is padded
and masked. NCHW-contiguous and channels_last (NHWC) inputs are read through their strides
and the output keeps the input's memory format.

Small groups (``rows``): a contiguous input's group is one contiguous row of CPG * HW values,
so when a row fits in registers one launch does it all: ``_gn_rows`` normalises BLOCK_R rows per
program, mean and then the centred variance from registers (two passes about the row's first
value, no cancellation).
The Triton interpreter pays ~8 ms per program whatever its size, so there it packs up to 64K
values per program: a UNet on 8x8 latents at batch 200 runs GroupNorm in ~10 programs instead of
6400 (28 s -> well under a second per call). On CUDA ``path="auto"`` picks by group size, as
measured on an H100 (see GROUP_MAX): rows up to 4096 values, the one-launch group path up to
32768, the split reduction beyond.

Middle-sized groups (``group``): ``_gn_group`` is the split path with one slice, in one
launch: one program per group computes the tile moments, merges them (Chan), then loops over
the group again to write it (that second read mostly hits L2).

Not supported: other memory layouts (copied to contiguous first), C not divisible by the
number of groups (an error, as in torch), fp64 / integer inputs (ops falls back).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SPLITS = 1024


def group_norm_ref(x, num_groups, weight, bias, eps=1e-5, silu=False):
    """float64 reference."""
    B, C = x.shape[:2]
    x64 = x.double().reshape(B, num_groups, -1)
    mean = x64.mean(-1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdim=True)
    y = ((x64 - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    bshape = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(bshape)
    if bias is not None:
        y = y + bias.double().reshape(bshape)
    return y * torch.sigmoid(y) if silu else y


@triton.jit
def _gn_stats(
    x, mean_out, m2_out, cnt_out,
    sxb, sxc, sxs,
    G, CPG, HW, CHUNK, S,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_bg = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    mask_c = offs_c < CPG
    base = x + b * sxb + (g * CPG + offs_c[:, None]).to(tl.int64) * sxc
    # Moments of x - pivot (the group's first element): a large common offset cannot then
    # swamp the fp32 sums; the variance is shift-invariant and apply undoes the shift.
    pivot = tl.load(x + b * sxb + (g * CPG).to(tl.int64) * sxc).to(tl.float32)

    start = split * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for s0 in range(start, end, BLOCK_S):
        pos = s0 + offs_s
        mask = mask_c[:, None] & (pos < end)[None, :]
        v = tl.load(base + pos[None, :].to(tl.int64) * sxs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, v - pivot, 0.0)
        n_t = tl.sum(tl.sum(mask.to(tl.float32), 1), 0)
        mean_t = tl.sum(tl.sum(v, 1), 0) / n_t
        d = tl.where(mask, v - mean_t, 0.0)
        m2_t = tl.sum(tl.sum(d * d, 1), 0)
        n_new = n + n_t
        delta = mean_t - mean
        mean = mean + delta * (n_t / n_new)
        m2 = m2 + m2_t + delta * delta * (n * n_t / n_new)
        n = n_new
    tl.store(mean_out + pid_bg * S + split, mean)
    tl.store(m2_out + pid_bg * S + split, m2)
    tl.store(cnt_out + pid_bg * S + split, n)


@triton.jit
def _gn_apply(
    x, y, w, bias, mean_in, m2_in, cnt_in,
    sxb, sxc, sxs, syb, syc, sys,
    G, CPG, HW, CHUNK, S, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_bg = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G

    # Merge the group's S partial moments (Chan et al.), vectorised over the partials.
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < S
    cnt_p = tl.load(cnt_in + pid_bg * S + offs_p, mask=mask_p, other=0.0)
    mean_p = tl.load(mean_in + pid_bg * S + offs_p, mask=mask_p, other=0.0)
    m2_p = tl.load(m2_in + pid_bg * S + offs_p, mask=mask_p, other=0.0)
    n = tl.sum(cnt_p, 0)
    mean = tl.sum(cnt_p * mean_p, 0) / n
    dm = mean_p - mean
    m2 = tl.sum(m2_p + cnt_p * dm * dm, 0)
    rstd = 1.0 / tl.sqrt(m2 / n + eps)
    pivot = tl.load(x + b * sxb + (g * CPG).to(tl.int64) * sxc).to(tl.float32)

    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CPG
    ch = g * CPG + offs_c
    a = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    if HAS_W:
        a = a * tl.load(w + ch, mask=mask_c, other=0.0).to(tl.float32)
    shift = -mean * a
    if HAS_B:
        shift = shift + tl.load(bias + ch, mask=mask_c, other=0.0).to(tl.float32)

    offs_s = tl.arange(0, BLOCK_S)
    xbase = x + b * sxb + ch[:, None].to(tl.int64) * sxc
    ybase = y + b * syb + ch[:, None].to(tl.int64) * syc
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    for s0 in range(start, end, BLOCK_S):
        pos = (s0 + offs_s)[None, :]
        mask = mask_c[:, None] & (pos < end)
        v = tl.load(xbase + pos.to(tl.int64) * sxs, mask=mask, other=0.0).to(tl.float32)
        out = (v - pivot) * a[:, None] + shift[:, None]
        if SILU:
            out = out * tl.sigmoid(out)
        tl.store(ybase + pos.to(tl.int64) * sys, out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_rows(
    x, y, w, bias,
    R, G, CPG, HW, L, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = b * G + g
    cols = tl.arange(0, BLOCK_L)  # within the group: channel (cols // HW), pixel (cols % HW)
    mask = (rows < R)[:, None] & (cols < L)[None, :]
    offs = rows[:, None].to(tl.int64) * L + cols[None, :]
    # About each row's first value, as the split path: a large common offset then cannot cost
    # the fp32 sum of the mean its precision.
    pivot = tl.load(x + rows.to(tl.int64) * L, mask=rows < R, other=0.0).to(tl.float32)
    v = tl.where(mask, tl.load(x + offs, mask=mask, other=0.0).to(tl.float32) - pivot[:, None], 0.0)
    mean = tl.sum(v, 1) / L
    d = tl.where(mask, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / L + eps)
    out = d * rstd[:, None]
    ch = (rows % G)[:, None] * CPG + (cols // HW)[None, :]
    if HAS_W:
        out = out * tl.load(w + ch, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        out = out + tl.load(bias + ch, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(y + offs, out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_group(
    x, y, w, bias,
    sxb, sxc, sxs, syb, syc, sys,
    G, CPG, HW, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (batch, group), one launch: the split path's two kernels with S = 1 —
    tile moments merged with Chan's formula, then the apply loop over the same tiles (the
    second read of a small group comes from L2)."""
    pid_bg = tl.program_id(0).to(tl.int64)
    b = pid_bg // G
    g = pid_bg % G
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    mask_c = offs_c < CPG
    ch = g * CPG + offs_c
    xbase = x + b * sxb + ch[:, None].to(tl.int64) * sxc
    pivot = tl.load(x + b * sxb + (g * CPG).to(tl.int64) * sxc).to(tl.float32)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for s0 in range(0, HW, BLOCK_S):
        pos = s0 + offs_s
        mask = mask_c[:, None] & (pos < HW)[None, :]
        v = tl.load(xbase + pos[None, :].to(tl.int64) * sxs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, v - pivot, 0.0)
        n_t = tl.sum(tl.sum(mask.to(tl.float32), 1), 0)
        mean_t = tl.sum(tl.sum(v, 1), 0) / n_t
        d = tl.where(mask, v - mean_t, 0.0)
        m2_t = tl.sum(tl.sum(d * d, 1), 0)
        n_new = n + n_t
        delta = mean_t - mean
        mean = mean + delta * (n_t / n_new)
        m2 = m2 + m2_t + delta * delta * (n * n_t / n_new)
        n = n_new
    rstd = 1.0 / tl.sqrt(m2 / n + eps)
    a = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    if HAS_W:
        a = a * tl.load(w + ch, mask=mask_c, other=0.0).to(tl.float32)
    shift = -mean * a
    if HAS_B:
        shift = shift + tl.load(bias + ch, mask=mask_c, other=0.0).to(tl.float32)
    ybase = y + b * syb + ch[:, None].to(tl.int64) * syc
    for s0 in range(0, HW, BLOCK_S):
        pos = (s0 + offs_s)[None, :]
        mask = mask_c[:, None] & (pos < HW)
        v = tl.load(xbase + pos.to(tl.int64) * sxs, mask=mask, other=0.0).to(tl.float32)
        out = (v - pivot) * a[:, None] + shift[:, None]
        if SILU:
            out = out * tl.sigmoid(out)
        tl.store(ybase + pos.to(tl.int64) * sys, out.to(y.dtype.element_ty), mask=mask)


# Longest group (CPG * HW) the rows kernel holds in registers, and values per program; the
# interpreter has no registers to run out of, only a per-program cost.
ROWS_MAX = 65536 if INTERPRET else 4096
_ROWS_TILE = 65536 if INTERPRET else 4096
# The group path's tile (values per loop iteration) and warps (0: by tile size); module
# attributes so that benchmarks/sweep_kernels.py can try others. 8192 values and 8 warps
# were fastest at every UNet shape in the H100 sweep (1.2-1.6x the 4096 tile).
GROUP_TILE = 65536 if INTERPRET else 8192
GROUP_WARPS = 0
# On CUDA, path="auto" takes the group path for contiguous groups of at most GROUP_MAX values
# (rows up to ROWS_MAX), the split reduction above. Measured on an H100, fp16, batch 2
# (benchmarks/results/sweep-NVIDIA-H100-80GB-HBM3-2026-11-24-4132486.json): at L = CPG * HW
# <= 30720 the group path beat the split one 1.6-5.6x (it needs one launch, no partials, and
# 64 programs of up to 30K values keep the SMs busy enough); at L >= 40960 the split one won
# (0.015 vs 0.022 ms at 40960, 2-4x at the VAE's 262144+). channels_last was not swept:
# it keeps the split path.
GROUP_MAX = 32768


_sm_count = {}


def _target_programs(device) -> int:
    if INTERPRET or device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 4 * _sm_count[idx]


def _layout(x):
    """(batch, channel, flattened-spatial) strides when the spatial dims flatten to one stride."""
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return None


def unsupported(x, num_groups, weight, bias) -> str | None:
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} not in {DTYPES}"
    if x.dim() < 2:
        return f"needs [B, C, *spatial], got {x.dim()}-D"
    if x.numel() == 0:
        return "empty input"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[1] or t.device != x.device):
            return f"{name} must be 1-D [C] on {x.device}"
    return None


def auto_path(layout, L, splits, gpu) -> str:
    """What path="auto" runs for a group of L = CPG * HW values in `layout` ("contiguous",
    "channels_last"...); `gpu`: compiled CUDA, not the interpreter. See GROUP_MAX."""
    if layout == "contiguous" and L <= ROWS_MAX and splits is None:
        return "rows"
    if gpu and layout == "contiguous" and L <= GROUP_MAX and splits is None:
        return "group"
    return "split"


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, out=None, splits=None, path="auto"):
    """GroupNorm (+ SiLU) of x [B, C, *spatial] -> same shape, dtype and memory format.

    ``path``: "split" (the two-launch split reduction), "rows" (one launch, whole groups in
    registers: contiguous inputs with CPG * HW <= ROWS_MAX only), "group" (one launch, one
    program per group looping over it twice: any layout) or "auto" (rows where it
    applies; on CUDA the group path for contiguous groups up to GROUP_MAX values; else
    split). ``splits`` forces the number of slices per group of the split path (tests use it
    to exercise the merge)."""
    if path not in ("auto", "rows", "split", "group"):
        raise ValueError(f"group_norm: path must be 'auto', 'rows', 'split' or 'group', got {path!r}")
    why = unsupported(x, num_groups, weight, bias)
    if why:
        raise ValueError(f"group_norm kernel: {why}")
    B, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"group_norm: {C} channels are not divisible by {num_groups} groups")
    layout = _layout(x)
    if layout is None:
        x, layout = x.contiguous(), "contiguous"
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
           "channels_last_3d": torch.channels_last_3d}[layout]
    if out is None:
        out = torch.empty_like(x, memory_format=fmt)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride() != x.stride():
        raise ValueError("group_norm: out must match x in shape, dtype and strides")
    G = num_groups
    cpg = C // G
    HW = x.numel() // (B * C)
    if layout == "contiguous":
        sxs, sys_ = 1, 1
    else:
        sxs, sys_ = C, C
    sxb, sxc = x.stride(0), x.stride(1)
    syb, syc = out.stride(0), out.stride(1)

    L = cpg * HW
    rows_ok = layout == "contiguous" and L <= ROWS_MAX and splits is None
    if path == "rows" and not rows_ok:
        raise ValueError(f"group_norm: the rows path needs a contiguous input with channels per group x "
                         f"pixels <= {ROWS_MAX} (got {layout}, {cpg} x {HW}) and no splits")
    if path == "auto":
        path = auto_path(layout, L, splits, x.device.type == "cuda" and not INTERPRET)
    if path == "rows":
        block_l = triton.next_power_of_2(L)
        block_r = max(1, min(triton.next_power_of_2(B * G), _ROWS_TILE // block_l))
        _gn_rows[(triton.cdiv(B * G, block_r),)](
            x, out, weight if weight is not None else x, bias if bias is not None else x,
            B * G, G, cpg, HW, L, float(eps),
            HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu),
            BLOCK_R=block_r, BLOCK_L=block_l, num_warps=4 if block_r * block_l <= 2048 else 8,
        )
        return out

    block_c = triton.next_power_of_2(cpg)
    if path == "group":
        if splits is not None:
            raise ValueError("group_norm: the group path takes no splits (one program per group)")
        block_s = max(16, min(triton.next_power_of_2(HW), max(1, GROUP_TILE // block_c)))
        _gn_group[(B * G,)](
            x, out, weight if weight is not None else x, bias if bias is not None else x,
            sxb, sxc, sxs, syb, syc, sys_, G, cpg, HW, float(eps),
            HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu),
            BLOCK_C=block_c, BLOCK_S=block_s,
            num_warps=GROUP_WARPS or (4 if block_c * block_s <= 2048 else 8),
        )
        return out
    block_s = max(16, min(triton.next_power_of_2(HW), max(1, 4096 // block_c)))
    if splits is None:
        splits = triton.cdiv(_target_programs(x.device), B * G)
    splits = max(1, min(splits, HW, _MAX_SPLITS))
    chunk = triton.cdiv(HW, splits)
    if chunk >= block_s:  # whole tiles per slice, but never fewer slices than asked for small HW
        chunk = triton.cdiv(chunk, block_s) * block_s
    splits = triton.cdiv(HW, chunk)  # no empty slice: each has >= 1 pixel

    part = torch.empty((3, B * G * splits), device=x.device, dtype=torch.float32)
    mean_p, m2_p, cnt_p = part[0], part[1], part[2]
    warps = 4 if block_c * block_s <= 2048 else 8
    _gn_stats[(B * G, splits)](
        x, mean_p, m2_p, cnt_p, sxb, sxc, sxs, G, cpg, HW, chunk, splits,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps,
    )
    _gn_apply[(B * G, splits)](
        x, out, weight if weight is not None else x, bias if bias is not None else x,
        mean_p, m2_p, cnt_p,
        sxb, sxc, sxs, syb, syc, sys_,
        G, cpg, HW, chunk, splits, float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu),
        BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_P=max(2, triton.next_power_of_2(splits)),
        num_warps=warps,
    )
    return out
