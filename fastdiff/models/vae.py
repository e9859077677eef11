"""The KL autoencoder of Stable Diffusion 1.x / 2.x (diffusers' AutoencoderKL).

Parameter names are diffusers' state_dict keys. Built from a diffusers ``vae/config.json`` dict;
unused keys are ignored. ``encode(images) -> moments`` (mean and log-variance stacked on the
channel axis, as diffusers' DiagonalGaussianDistribution.parameters); ``latent_mean`` and
``sample`` turn moments into latents. ``decode(latents) -> images`` takes unscaled latents (the
pipeline multiplies by ``1 / scaling_factor``) and returns images nominally in [-1, 1],
not clamped (as diffusers; the pipeline clamps when it makes pixels).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from fastdiff.models.unet import Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D


@dataclass
class VAEConfig:
    """diffusers AutoencoderKL config keys with diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> "VAEConfig":
        cfg = cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})
        bad = {}
        if cfg.act_fn not in ("silu", "swish"):
            bad["act_fn"] = cfg.act_fn
        if any(t != "DownEncoderBlock2D" for t in cfg.down_block_types):
            bad["down_block_types"] = cfg.down_block_types
        if any(t != "UpDecoderBlock2D" for t in cfg.up_block_types):
            bad["up_block_types"] = cfg.up_block_types
        if bad:
            raise NotImplementedError(f"AutoencoderKL: unsupported config options {bad}")
        return cfg


EPS = 1e-6  # every norm in the VAE


class MidAttention(Attention):
    """Single-head self-attention over all pixels, with its own GroupNorm and the residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = GroupNorm(groups, channels, EPS)

    def forward(self, x):  # [B, C, H, W]
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # [B, HW, C]
        h = super().forward(h)  # [B, HW, C]
        return h.transpose(1, 2).reshape(B, C, H, W) + x


class MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, attention, resnet."""

    def __init__(self, ch: int, groups: int, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([MidAttention(ch, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, EPS) for _ in range(2)])

    def forward(self, x):  # [B, C, H, W]
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, EPS) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)]) if downsample else None

    def forward(self, x):  # [B, Cin, H, W] -> [B, Cout, H/2, W/2]
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, EPS) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x):  # [B, Cin, H, W] -> [B, Cout, 2H, 2W]
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        boc, g, n = list(cfg.block_out_channels), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownEncoderBlock2D(boc[max(i - 1, 0)], boc[i], cfg.layers_per_block, g, i < n - 1)
             for i in range(n)]
        )
        self.mid_block = MidBlock(boc[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, boc[-1], EPS, silu=True)
        self.conv_out = nn.Conv2d(boc[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):  # [B, 3, H, W] -> [B, 2*latent, H/f, W/f]
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rboc, g, n = list(cfg.block_out_channels)[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rboc[0], 3, padding=1)
        self.mid_block = MidBlock(rboc[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [UpDecoderBlock2D(rboc[max(i - 1, 0)], rboc[i], cfg.layers_per_block + 1, g, i < n - 1)
             for i in range(n)]
        )
        self.conv_norm_out = GroupNorm(g, rboc[-1], EPS, silu=True)
        self.conv_out = nn.Conv2d(rboc[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):  # [B, latent, h, w] -> [B, 3, h*f, w*f]
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


class AutoencoderKL(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        cfg = self.config = VAEConfig.from_dict(config)
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = cfg.shift_factor or 0.0
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    def encode(self, images):
        """images [B, 3, H, W] in [-1, 1] -> moments [B, 2*latent, H/f, W/f] (mean, logvar)."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    @staticmethod
    def latent_mean(moments):
        """The latent distribution's mean (the deterministic encoding): [B, latent, h, w]."""
        return moments.chunk(2, dim=1)[0]

    @staticmethod
    def sample(moments, generator: torch.Generator | None = None):
        """A draw from the latent distribution, as diffusers' DiagonalGaussianDistribution.sample."""
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        gen_device = generator.device if generator is not None else moments.device
        noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=moments.dtype)
        return mean + std * noise.to(moments.device)

    def decode(self, latents):
        """Unscaled latents [B, latent, h, w] -> images [B, 3, h*f, w*f], nominally in [-1, 1]."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)
