"""The Stable Diffusion 1.x / 2.x UNet (diffusers' UNet2DConditionModel, the subset SD uses).

Module and parameter names are diffusers' state_dict keys, so a diffusers ``unet/`` folder loads
with ``load_state_dict(strict=True)`` and no renaming. Built from the folder's config.json dict;
keys we do not use are ignored, options that would change the maths and that we do not implement
raise instead of being silently ignored.

Norms, attention and GEGLU go through ``fastdiff.ops`` (Triton on CUDA, torch elsewhere);
convolutions and linears stay torch modules. The building blocks here (ResnetBlock2D, Attention,
Downsample2D, Upsample2D, GroupNorm) are shared with the VAE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff import ops

# ---------------------------------------------------------------------------------------------
# config


@dataclass
class UNetConfig:
    """The diffusers UNet2DConditionModel config keys SD 1.x/2.x use, with diffusers' defaults.

    ``upcast_attention`` (SD 2.1-v) is accepted and needs nothing: ops.attention always
    computes QK^T and the softmax in fp32."""

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 1280
    transformer_layers_per_block: int | tuple = 1
    # diffusers' historical naming: attention_head_dim is the number of heads per block
    # (SD 1.x: 8; SD 2.x: [5, 10, 20, 20], i.e. a head size of 64) unless num_attention_heads is set.
    attention_head_dim: int | tuple = 8
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: int | None = None  # latent size the model was trained at (64 for SD 1.5)

    # options outside SD 1.x/2.x: key -> the only value we implement (diffusers' default)
    _DEFAULTS_ONLY = {
        "only_cross_attention": False,
        "dual_cross_attention": False,
        "class_embed_type": None,
        "addition_embed_type": None,
        "num_class_embeds": None,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "resnet_time_scale_shift": "default",
        "resnet_skip_time_act": False,
        "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "time_cond_proj_dim": None,
        "attention_type": "default",
        "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None,
        "cross_attention_norm": None,
        "reverse_transformer_layers_per_block": None,
    }

    @classmethod
    def from_dict(cls, config: dict) -> "UNetConfig":
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in names})
        bad = {
            k: config[k]
            for k, default in cls._DEFAULTS_ONLY.items()
            if k in config and config[k] != default
            # mid_block_only_cross_attention=False is what None resolves to for SD
            and not (k == "mid_block_only_cross_attention" and config[k] is False)
        }
        if cfg.act_fn not in ("silu", "swish"):
            bad["act_fn"] = cfg.act_fn
        if cfg.norm_num_groups is None:
            bad["norm_num_groups"] = None
        if cfg.mid_block_type != "UNetMidBlock2DCrossAttn":
            bad["mid_block_type"] = cfg.mid_block_type
        for t in (*cfg.down_block_types, *cfg.up_block_types):
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
                bad.setdefault("block_types", []).append(t)
        if not all(isinstance(n, int) for n in _per_block(cfg.transformer_layers_per_block, 1)):
            bad["transformer_layers_per_block"] = cfg.transformer_layers_per_block
        if bad:
            raise NotImplementedError(f"UNet2DCondition: unsupported config options {bad}")
        return cfg


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


# ---------------------------------------------------------------------------------------------
# shared building blocks (the VAE uses them too)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm's parameters, computed by ops.group_norm; ``silu`` fuses the SiLU after it."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False):
        super().__init__(num_groups, num_channels, eps=eps)
        self.silu = silu

    def forward(self, x):  # [B, C, *spatial]
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):  # [..., C]
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class RowLinear(nn.Linear):
    """nn.Linear for the time embedding's [B, C] rows, through ops.linear_rows: a row's value
    does not depend on what else is in its batch."""

    def forward(self, x):  # [B, in] -> [B, out]
        return ops.linear_rows(x, self.weight, self.bias)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice with the time embedding added in between (diffusers' pre_norm)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, groups: int, eps: float,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch, eps, silu=True)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = RowLinear(temb_ch, out_ch) if temb_ch is not None else None
        self.norm2 = GroupNorm(groups, out_ch, eps, silu=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb_act=None):
        # x [B, Cin, H, W]; temb_act [B, T] is SiLU(time embedding), applied once by the UNet
        # rather than in every block as diffusers does.
        h = self.conv1(self.norm1(x))  # [B, Cout, H, W]
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.norm2(h))  # dropout is the identity at inference
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        if self.output_scale_factor != 1.0:
            return (x + h) / self.output_scale_factor
        return x + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.padding = padding

    def forward(self, x):  # [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]
        if self.padding == 0:
            # the VAE pads right/bottom only (the original LDM code)
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):  # [B, C, H, W] -> [B, C, 2H, 2W] (or `size`)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention, self (context=None) or cross.

    ``kv_hook``, when set, is called as ``kv_hook(ctx) -> (ctx_k, ctx_v)`` on the context (the
    normed hidden states in self-attention) before to_k/to_v: A1111 hypernetworks. It is not
    registered as a submodule: it never shows in state_dict() and .to() does not move it.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # to_out.1 is diffusers' dropout
        self.kv_hook = None

    def __setattr__(self, name, value):
        if name == "kv_hook":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x, context=None):
        # x [B, Lq, Cq], context [B, Lk, Cctx] (None: self-attention)
        ctx = x if context is None else context
        ctx_k = ctx_v = ctx
        if self.kv_hook is not None:
            ctx_k, ctx_v = self.kv_hook(ctx)
        B, Lq, _ = x.shape
        H, D = self.heads, self.dim_head
        q = self.to_q(x).view(B, Lq, H, D).transpose(1, 2)  # [B, H, Lq, D]
        k = self.to_k(ctx_k).view(B, -1, H, D).transpose(1, 2)  # [B, H, Lk, D]
        v = self.to_v(ctx_v).view(B, -1, H, D).transpose(1, 2)  # [B, H, Lk, D]
        out = ops.attention(q, k, v, scale=D**-0.5)  # [B, H, Lq, D]
        out = out.transpose(1, 2).reshape(B, Lq, H * D)  # [B, Lq, H*D]
        return self.to_out[0](out)


# ---------------------------------------------------------------------------------------------
# the transformer that sits after each resnet in the cross-attention blocks


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):  # [B, L, dim_in] -> [B, L, dim_out]
        return ops.geglu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        # net.1 is diffusers' dropout; kept as an Identity so net.2 keeps its checkpoint name
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x):  # [B, L, dim]
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):  # x [B, HW, C], context [B, L, Cctx]
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """[B, C, H, W] -> tokens [B, HW, C] -> transformer blocks -> back, plus the residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, layers: int,
                 linear_proj: bool):
        super().__init__()
        dim_head = channels // heads
        inner = heads * dim_head
        self.linear_proj = linear_proj
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        if linear_proj:  # SD 2.x
            self.proj_in = nn.Linear(channels, inner)
        else:  # SD 1.x
            self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(layers)]
        )
        if linear_proj:
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):  # x [B, C, H, W], context [B, L, Cctx]
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear_proj:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # [B, HW, inner]
        else:
            h = self.proj_in(h)
            h = h.permute(0, 2, 3, 1).reshape(B, H * W, h.shape[1])  # [B, HW, inner]
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
        else:
            h = self.proj_out(h.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous())
        return h + x  # [B, C, H, W]


# ---------------------------------------------------------------------------------------------
# down / mid / up blocks. One class each covers diffusers' plain and CrossAttn variants: a plain
# block simply has no `attentions`.


@dataclass
class _BlockArgs:
    temb_ch: int
    groups: int
    eps: float
    heads: int
    context_dim: int
    transformer_layers: int
    linear_proj: bool

    def transformer(self, channels: int) -> Transformer2DModel:
        return Transformer2DModel(channels, self.heads, self.context_dim, self.groups,
                                  self.transformer_layers, self.linear_proj)


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, cross_attn: bool, downsample: bool,
                 padding: int, a: _BlockArgs):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, a.temb_ch, a.groups, a.eps)
             for i in range(layers)]
        )
        self.attentions = nn.ModuleList([a.transformer(out_ch) for _ in range(layers)] if cross_attn else [])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding)]) if downsample else None

    def forward(self, x, temb_act, context):
        # -> x [B, Cout, H', W'] and the skip states the up blocks concatenate back
        states = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb_act)
            if len(self.attentions):
                x = self.attentions[i](x, context)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    def __init__(self, ch: int, scale: float, a: _BlockArgs):
        super().__init__()
        self.attentions = nn.ModuleList([a.transformer(ch)])
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(ch, ch, a.temb_ch, a.groups, a.eps, scale) for _ in range(2)]
        )

    def forward(self, x, temb_act, context):  # [B, C, H, W]
        x = self.resnets[0](x, temb_act)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb_act)


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, prev_out_ch: int, out_ch: int, layers: int, cross_attn: bool,
                 upsample: bool, a: _BlockArgs):
        super().__init__()
        resnets = []
        for i in range(layers):
            skip_ch = in_ch if i == layers - 1 else out_ch
            res_in = prev_out_ch if i == 0 else out_ch
            resnets.append(ResnetBlock2D(res_in + skip_ch, out_ch, a.temb_ch, a.groups, a.eps))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([a.transformer(out_ch) for _ in range(layers)] if cross_attn else [])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, skips, temb_act, context, size=None):
        # x [B, Cprev, H, W]; skips: this block's skip states, popped from the end
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb_act)
            if len(self.attentions):
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


# ---------------------------------------------------------------------------------------------
# the UNet


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0,
                       max_period: int = 10000):
    """Sinusoidal timestep embedding exactly as diffusers' get_timestep_embedding. t [B] -> [B, dim]."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - shift))  # [half]
    args = t[:, None].float() * freqs[None]  # [B, half]
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    else:
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # [B, dim] fp32


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = RowLinear(in_dim, dim)
        self.linear_2 = RowLinear(dim, dim)

    def forward(self, x):  # [B, in_dim] -> [B, dim]
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet2DCondition(nn.Module):
    """forward(x [B, Cin, H, W], t [B] or scalar, context [B, L, Dctx]) -> [B, Cout, H, W].

    What the output means (epsilon or v) is the scheduler's business, set by the pipeline.
    """

    def __init__(self, config: dict):
        super().__init__()
        cfg = self.config = UNetConfig.from_dict(config)
        boc = list(cfg.block_out_channels)
        n = len(boc)
        layers = _per_block(cfg.layers_per_block, n)
        heads = _per_block(cfg.num_attention_heads or cfg.attention_head_dim, n)
        context_dim = _per_block(cfg.cross_attention_dim, n)
        tlayers = _per_block(cfg.transformer_layers_per_block, n)
        temb_ch = boc[0] * 4

        def args(i):
            return _BlockArgs(temb_ch, cfg.norm_num_groups, cfg.norm_eps, heads[i], context_dim[i],
                              tlayers[i], cfg.use_linear_projection)

        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], cfg.conv_in_kernel,
                                 padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(boc[0], temb_ch)

        self.down_blocks = nn.ModuleList()
        out_ch = boc[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            self.down_blocks.append(DownBlock(
                in_ch, out_ch, layers[i], kind == "CrossAttnDownBlock2D", i < n - 1,
                cfg.downsample_padding, args(i)))

        self.mid_block = MidBlock(boc[-1], cfg.mid_block_scale_factor, args(n - 1))

        # Up blocks mirror the down blocks. Each takes one resnet more than its down block, which
        # eats the downsampler's skip state. (diffusers reverses heads, layers, context dims and
        # transformer layers but indexes attention_head_dim unreversed; the latter only matters
        # to blocks that ignore it.)
        rboc, rlayers, rheads = boc[::-1], layers[::-1], heads[::-1]
        rctx, rtl = context_dim[::-1], tlayers[::-1]
        self.up_blocks = nn.ModuleList()
        out_ch = rboc[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_out, out_ch = out_ch, rboc[i]
            in_ch = rboc[min(i + 1, n - 1)]
            a = _BlockArgs(temb_ch, cfg.norm_num_groups, cfg.norm_eps, rheads[i], rctx[i], rtl[i],
                           cfg.use_linear_projection)
            self.up_blocks.append(UpBlock(
                in_ch, prev_out, out_ch, rlayers[i] + 1, kind == "CrossAttnUpBlock2D", i < n - 1, a))

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, boc[0], cfg.norm_eps, silu=True)
        self.conv_out = nn.Conv2d(boc[0], cfg.out_channels, cfg.conv_out_kernel,
                                  padding=(cfg.conv_out_kernel - 1) // 2)

    def attention_modules(self):
        """Every Attention (self and cross), in module order: where kv_hooks go."""
        return [m for m in self.modules() if isinstance(m, Attention)]

    def forward(self, x, t, context):
        # x [B, Cin, H, W], t [B] / [] / number, context [B, L, Dctx]
        B = x.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.float32, device=x.device)
        elif t.ndim == 0:
            t = t[None]
        t = t.to(x.device).expand(B)
        # diffusers computes the sinusoids in fp32 and casts to the model dtype before the MLP
        temb = self.time_embedding(timestep_embedding(
            t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
            self.config.freq_shift).to(x.dtype))  # [B, 4*C0]
        temb_act = F.silu(temb)  # every resnet applies SiLU before its time_emb_proj

        if self.config.center_input_sample:
            x = 2 * x - 1.0
        h = self.conv_in(x)  # [B, C0, H, W]
        skips = [h]
        for block in self.down_blocks:
            h, states = block(h, temb_act, context)
            skips.extend(states)

        h = self.mid_block(h, temb_act, context)  # [B, C_last, H/2^k, W/2^k]

        for block in self.up_blocks:
            n_skip = len(block.resnets)
            block_skips, skips = skips[-n_skip:], skips[:-n_skip]
            # upsample to the next skip's size: 2x, or less where an odd size was rounded up
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, block_skips, temb_act, context, size)

        return self.conv_out(self.conv_norm_out(h))  # [B, Cout, H, W]
