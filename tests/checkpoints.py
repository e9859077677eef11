"""Test helpers: tiny random SD-shaped models (diffusers / transformers stand-ins), an exporter
diffusers -> original LDM key names, an independent OpenCLIP text tower, and file writers.

The exporter is written from the LDM module layout (openaimodel / ldm autoencoder), not from
fastdiff's reader, and is itself checked against diffusers' own LDM -> diffusers converter."""
from __future__ import annotations

import functools
import json
import os
import re
from collections import OrderedDict

import torch
from torch import nn

from fastdiff.random_model import randomize_
from fastdiff.tokenizer import write_clip_vocab

# ------------------------------------------------------------------------------ random models


def tiny_unet_config(family: str = "sd1", in_channels: int = 4) -> dict:
    """Reduced SD-shaped UNet: three levels (last without attention), layers_per_block 2,
    heads following the SD rule (8 heads for SD 1.x, 64-wide heads for SD 2.x)."""
    if family == "sd1":
        widths, ctx, heads, linear, depth = [32, 64, 64], 64, 8, False, 1
    else:
        widths, ctx, heads, linear, depth = [64, 128, 128], 128, [1, 2, 2], True, 2
    return {
        "sample_size": 8,
        "in_channels": in_channels,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": widths,
        "layers_per_block": 2,
        "cross_attention_dim": ctx,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth,
        "norm_num_groups": 32,
    }


@functools.lru_cache(maxsize=None)
def tiny_unet(family="sd1", in_channels=4, seed=0):
    from diffusers import UNet2DConditionModel

    return randomize_(UNet2DConditionModel(**tiny_unet_config(family, in_channels)), seed)


def tiny_vae_config() -> dict:
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 64], "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    }


@functools.lru_cache(maxsize=None)
def tiny_vae(seed=1):
    from diffusers import AutoencoderKL

    return randomize_(AutoencoderKL(**tiny_vae_config()), seed)


def tiny_clip_config(width=64, layers=3, act="quick_gelu") -> dict:
    return {
        "vocab_size": 1000, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // 64), "max_position_embeddings": 16, "hidden_act": act,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }


def clip_model(cfg: dict, seed=None):
    from transformers import CLIPTextConfig, CLIPTextModel

    m = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)}))
    return randomize_(m, seed) if seed is not None else m.eval()


def clip_state_dict(model) -> dict:
    """CLIPTextModel weights under the on-disk names (`text_model.` prefix; transformers >= 5
    dropped that prefix from the module tree but files keep it)."""
    sd = model.state_dict()
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def load_clip(model, sd: dict):
    """Load `text_model.`-named weights into a transformers CLIPTextModel of either layout."""
    has_prefix = any(k.startswith("text_model.") for k in model.state_dict())
    if not has_prefix:
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return model


# ------------------------------------------------------------------ OpenCLIP text tower (SD 2.x)


class _ResBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([_ResBlock(width, heads) for _ in range(layers)])


class OpenCLIPText(nn.Module):
    """OpenCLIP's text tower as Stability's FrozenOpenCLIPEmbedder(layer='penultimate') uses it:
    token + positional embedding, all resblocks but the last under a causal mask, then ln_final."""

    def __init__(self, vocab=1000, ctx=16, width=128, layers=4, heads=2):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(ctx, width))
        self.transformer = _Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, width))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def penultimate(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        L = ids.shape[1]
        mask = torch.full((L, L), float("-inf")).triu(1)
        for blk in self.transformer.resblocks[:-1]:
            x = blk(x, mask)
        return self.ln_final(x)


# --------------------------------------------------------------------- diffusers -> LDM export

_RES_OUT = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(sd: dict, cfg: dict) -> dict:
    lpb = cfg["layers_per_block"]
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for k, v in sd.items():
        mod, leaf = k.rsplit(".", 1)
        if mod in fixed:
            new = f"{fixed[mod]}.{leaf}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", mod):
            i, j, sub = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + i * (lpb + 1) + j}.0.{_RES_OUT[sub]}.{leaf}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", mod):
            new = f"input_blocks.{1 + int(m[1]) * (lpb + 1) + int(m[2])}.1.{m[3]}.{leaf}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", mod):
            new = f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{leaf}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", mod):
            new = f"middle_block.{2 * int(m[1])}.{_RES_OUT[m[2]]}.{leaf}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", mod):
            new = f"middle_block.1.{m[1]}.{leaf}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", mod):
            new = f"output_blocks.{int(m[1]) * (lpb + 1) + int(m[2])}.0.{_RES_OUT[m[3]]}.{leaf}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", mod):
            new = f"output_blocks.{int(m[1]) * (lpb + 1) + int(m[2])}.1.{m[3]}.{leaf}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", mod):
            i = int(m[1])
            new = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if up_attn[i] else 1}.conv.{leaf}"
        else:
            raise KeyError(f"exporter does not know {k}")
        out[new] = v
    return out


def vae_to_ldm(sd: dict, cfg: dict) -> dict:
    n = len(cfg["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        new = None
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", k):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.\w+|(post_)?quant_conv\.\w+", k):
            new = k
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", k):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", k):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[3] == "weight" and v.ndim == 2:
                v = v[:, :, None, None]  # LDM's AttnBlock uses 1x1 convs
        if new is None:
            raise KeyError(f"exporter does not know {k}")
        out[new] = v
    return out


def sd1_single_file(unet, vae, clip) -> dict:
    sd = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    sd.update({"cond_stage_model.transformer." + k: v for k, v in clip_state_dict(clip).items()})
    return sd


def sd2_single_file(unet, vae, openclip: OpenCLIPText) -> dict:
    sd = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    sd.update({"cond_stage_model.model." + k: v for k, v in openclip.state_dict().items()})
    return sd


def add_ldm_extras(sd: dict, seed=0) -> dict:
    """What real single files carry besides the three models: EMA copies, schedule buffers."""
    g = torch.Generator().manual_seed(seed)
    sd = dict(sd)
    sd["betas"] = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64).float()
    sd["alphas_cumprod"] = torch.rand(1000, generator=g)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    for k in list(sd)[:5]:
        if k.startswith("model.diffusion_model."):
            sd["model_ema.diffusion_model" + k[len("model.diffusion_model."):].replace(".", "")] = sd[k].clone() + 1.0  # differs, so using it would show
    return sd


@functools.lru_cache(maxsize=None)
def tiny_clip(seed=3):
    """SD 1.x-style CLIP text model (quick_gelu, HF names)."""
    return clip_model(tiny_clip_config(), seed)


@functools.lru_cache(maxsize=None)
def tiny_openclip(seed=4):
    """SD 2.x-style OpenCLIP text tower (4 resblocks: the converted model keeps 3)."""
    return randomize_(OpenCLIPText(), seed)


# ------------------------------------------------------------------------------------ writers


def save_safetensors(sd: dict, path: str, metadata=None) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)
    return path


def save_diffusers_folder(root: str, unet, vae, clip, *, prediction_type="epsilon", family="sd1",
                          use_bin=False, strip_text_prefix=False) -> str:
    """A diffusers pipeline folder as `save_pretrained` would write it (plus tokenizer files)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}, f)
    for name, model in (("unet", unet), ("vae", vae)):
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({k: v for k, v in dict(model.config).items() if not k.startswith("_use")}, f)
        sd = model.state_dict()
        if use_bin:
            torch.save(sd, os.path.join(d, "diffusion_pytorch_model.bin"))
        else:
            save_safetensors(sd, os.path.join(d, "diffusion_pytorch_model.safetensors"))
    d = os.path.join(root, "text_encoder")
    os.makedirs(d, exist_ok=True)
    cfg = clip.config.to_dict()
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    sd = clip_state_dict(clip)
    if strip_text_prefix:
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    if use_bin:
        torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    else:
        save_safetensors(sd, os.path.join(d, "model.safetensors"))
    d = os.path.join(root, "scheduler")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                   "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": prediction_type}, f)
    d = os.path.join(root, "tokenizer")
    os.makedirs(d, exist_ok=True)
    pad = "<|endoftext|>" if family == "sd1" else "!"
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "pad_token": pad}, f)
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump({"!": 0, "<|startoftext|>": 49406, "<|endoftext|>": 49407}, f)
    return root


def real_vocab_clip_config(width=64, layers=2) -> dict:
    """tiny_clip_config with CLIP's real vocabulary size, context length and special ids, so
    prompts go through the real tokenizer."""
    cfg = tiny_clip_config(width=width, layers=layers)
    cfg.update(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
               pad_token_id=49407)
    return cfg


@functools.lru_cache(maxsize=None)
def real_vocab_clip(seed=3):
    return clip_model(real_vocab_clip_config(), seed)


def save_tiny_sd1(root, unet=None, vae=None) -> str:
    """A whole tiny SD 1.x diffusers folder (tiny_unet, tiny_vae unless given; real_vocab_clip)
    whose tokenizer/ holds CLIP's real vocabulary."""
    import shutil

    root = save_diffusers_folder(str(root), unet or tiny_unet(), vae or tiny_vae(), real_vocab_clip())
    shutil.rmtree(os.path.join(root, "tokenizer"))
    write_clip_vocab(os.path.join(root, "tokenizer"))
    return root


# ------------------------------------------------------------------------------- comparisons


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
