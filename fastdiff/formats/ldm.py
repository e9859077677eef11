"""Single-file checkpoints with the original CompVis/Stability LDM key names (.safetensors, .ckpt).

    model.diffusion_model.*           UNet (openaimodel: input_blocks / middle_block / output_blocks)
    first_stage_model.*               KL VAE (encoder.down.N.block.M / decoder.up.N ...)
    cond_stage_model.transformer.*    SD 1.x: HF CLIPTextModel names (very old files lack `text_model.`)
    cond_stage_model.model.*          SD 2.x: OpenCLIP ViT-H text tower (transformer.resblocks.N ...)
    model_ema.*, betas, alphas_cumprod, ...   ignored

Loading is a rename table from these names to diffusers / transformers names; the only
transformations are the ones diffusers' own converter does: OpenCLIP's fused in_proj split into
q/k/v rows, and the VAE mid-block attention's 1x1 convs read as linear weights. SD 2.x keeps 23
of the 24 OpenCLIP layers (Stability's SD 2 conditions on the penultimate layer + ln_final), so
the text encoder is a 23-layer CLIPTextModel with the final LayerNorm, exactly as diffusers stores it.

Architecture comes from tensor shapes and key names:
  family          OpenCLIP text tower -> SD 2.x, HF CLIP -> SD 1.x; without a text encoder,
                  context dim 1024 or a linear proj_in -> SD 2.x
  in/out channels conv_in / out.2 (9 in-channels = inpainting)
  widths, depth   resblock widths per level, resblocks per level, transformer blocks per attention
  heads           not stored in any shape: SD 1.x uses 8 heads everywhere, SD 2.x 64-wide heads
                  (attention_head_dim = width // 64 per block, as diffusers' SD 2 configs);
                  CLIP text: width // 64 heads (12 for 768, 16 for 1024)
  prediction      no key says it; the rule (A1111 loads SD 2.x non-inpainting checkpoints with the
                  768-v config unless a yaml says otherwise):
                    1. an explicit config (`prediction_type`) wins;
                    2. a yaml beside the file (model.yaml for model.safetensors, as A1111) with
                       `parameterization: "v"` -> v_prediction, a yaml without it -> epsilon;
                    3. SD 2.x with 4 in-channels -> v_prediction (SD 2.0/2.1-768-v and most
                       fine-tunes); SD 2.x inpainting and all SD 1.x -> epsilon.
                  SD 2.x *-base (512, epsilon) checkpoints therefore need
                  config={"prediction_type": "epsilon"} or their yaml.
Any of it can be overridden: config={"prediction_type": ..., "unet": {...}, "vae": {...},
"text_encoder": {...}, "scheduler": {...}} updates the inferred dicts.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict

from .common import CLIP_PAD, SD_SCHEDULER, VAE_ATTN_LEAVES
from .files import FormatError, TensorFile
from .source import Component, LazyTensor, ModelSource, _squeeze_1x1

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

# Keys that identify checkpoints of other model families, so they get a clear refusal.
_FOREIGN = (
    ("conditioner.embedders.", "an SDXL / SD-XL-family checkpoint (conditioner.embedders.*)"),
    ("control_model.", "a ControlNet"),
    ("lora_unet_", "a LoRA (kohya), not a full checkpoint"),
    ("lora_te_", "a LoRA (kohya), not a full checkpoint"),
    ("model.diffusion_model.joint_blocks.", "an SD3 checkpoint"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint"),
)


# ---------------------------------------------------------------------------------------- UNet

_RESNET_LEAVES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _ids(keys, prefix: str) -> list[int]:
    """Sorted distinct N of keys 'prefix.N.*'."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _count_transformers(keys, block: str) -> int:
    return len(_ids(keys, f"{block}.transformer_blocks"))


def infer_unet_config(shapes: dict[str, tuple], family: str, path: str) -> dict:
    """Diffusers UNet2DConditionModel config from LDM UNet key shapes (keys without prefix)."""
    keys = list(shapes)
    try:
        conv_in = shapes["input_blocks.0.0.weight"]  # [C, in, 3, 3]
        conv_out = shapes["out.2.weight"]  # [out, C, 3, 3]
    except KeyError as e:
        raise FormatError(f"{path}: UNet has no {UNET_PREFIX}{e.args[0]}: not an SD UNet") from None

    levels: list[list[tuple[int, int]]] = [[]]  # per level: (width, transformer depth or 0)
    for i in _ids(keys, "input_blocks")[1:]:
        if f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])
            continue
        w = shapes.get(f"input_blocks.{i}.0.out_layers.3.weight")
        if w is None:
            raise FormatError(f"{path}: {UNET_PREFIX}input_blocks.{i} is neither a ResBlock nor a downsampler")
        levels[-1].append((w[0], _count_transformers(keys, f"input_blocks.{i}.1")))
    if not levels[-1]:
        raise FormatError(f"{path}: UNet ends with a downsampler; not an SD UNet")
    lpb = {len(lv) for lv in levels}
    if len(lpb) != 1:
        raise FormatError(f"{path}: UNet levels have different resblock counts {[len(lv) for lv in levels]}")
    lpb = lpb.pop()
    block_out = [lv[0][0] for lv in levels]
    depths = [lv[0][1] for lv in levels]
    down_types = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths]
    up_types = []
    for i in range(len(levels)):
        has = f"output_blocks.{i * (lpb + 1)}.1.proj_in.weight" in shapes
        up_types.append("CrossAttnUpBlock2D" if has else "UpBlock2D")

    attn_k = [k for k in keys if k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in keys if k.endswith(".proj_in.weight")]
    if not attn_k or not proj_in:
        raise FormatError(f"{path}: UNet has no cross-attention; not an SD 1.x/2.x UNet")
    context_dim = shapes[attn_k[0]][1]
    linear_proj = len(shapes[proj_in[0]]) == 2
    nonzero = [d for d in depths if d] or [1]
    tlpb = nonzero[0] if len(set(nonzero)) == 1 else [max(d, 1) for d in depths]
    if family == "sd2":
        heads = [max(1, c // 64) for c in block_out]
    else:
        heads = 8
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": down_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up_types,
        "only_cross_attention": False,
        "block_out_channels": block_out,
        "layers_per_block": lpb,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": context_dim,
        "transformer_layers_per_block": tlpb,
        "attention_head_dim": heads,
        "use_linear_projection": linear_proj,
        "upcast_attention": False,
        "dual_cross_attention": False,
        "class_embed_type": None,
        "num_class_embeds": None,
        "resnet_time_scale_shift": "default",
    }


def unet_module_table(cfg: dict) -> dict[str, tuple[str, dict | None]]:
    """LDM module prefix -> (diffusers module prefix, leaf renames or None) for this config."""
    lpb = cfg["layers_per_block"]
    n = len(cfg["block_out_channels"])
    t: dict[str, tuple[str, dict | None]] = {
        "time_embed.0": ("time_embedding.linear_1", None),
        "time_embed.2": ("time_embedding.linear_2", None),
        "input_blocks.0.0": ("conv_in", None),
        "out.0": ("conv_norm_out", None),
        "out.2": ("conv_out", None),
        "middle_block.0": ("mid_block.resnets.0", _RESNET_LEAVES),
        "middle_block.1": ("mid_block.attentions.0", None),
        "middle_block.2": ("mid_block.resnets.1", _RESNET_LEAVES),
    }
    for i in range(n):
        attn = cfg["down_block_types"][i].startswith("CrossAttn")
        for j in range(lpb):
            k = 1 + i * (lpb + 1) + j
            t[f"input_blocks.{k}.0"] = (f"down_blocks.{i}.resnets.{j}", _RESNET_LEAVES)
            if attn:
                t[f"input_blocks.{k}.1"] = (f"down_blocks.{i}.attentions.{j}", None)
        if i < n - 1:
            t[f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", None)
    for i in range(n):
        attn = cfg["up_block_types"][i].startswith("CrossAttn")
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            t[f"output_blocks.{k}.0"] = (f"up_blocks.{i}.resnets.{j}", _RESNET_LEAVES)
            if attn:
                t[f"output_blocks.{k}.1"] = (f"up_blocks.{i}.attentions.{j}", None)
        if i < n - 1:
            last = i * (lpb + 1) + lpb
            t[f"output_blocks.{last}.{2 if attn else 1}.conv"] = (f"up_blocks.{i}.upsamplers.0.conv", None)
    return t


def _rename(key: str, table: dict[str, tuple[str, dict | None]]) -> str | None:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        hit = table.get(".".join(parts[:cut]))
        if hit is None:
            continue
        new_prefix, leaves = hit
        leaf = ".".join(parts[cut:])
        if leaves:
            lp = leaf.split(".")
            for lcut in range(len(lp) - 1, 0, -1):
                sub = leaves.get(".".join(lp[:lcut]))
                if sub is not None:
                    leaf = ".".join([sub] + lp[lcut:])
                    break
        return f"{new_prefix}.{leaf}"
    return None


# ----------------------------------------------------------------------------------------- VAE


def ldm_vae_to_diffusers(key: str, num_levels: int) -> str | None:
    """One LDM VAE key (no first_stage_model. prefix) -> diffusers AutoencoderKL key."""
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return key if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key) else None
    side, rest = m.groups()
    if (r := re.fullmatch(r"(conv_in|conv_out)\.(weight|bias)", rest)):
        return key
    if (r := re.fullmatch(r"norm_out\.(weight|bias)", rest)):
        return f"{side}.conv_norm_out.{r.group(1)}"
    if (r := re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(.+)", rest)):
        kind, lvl, j, leaf = r.groups()
        lvl = int(lvl)
        if kind == "up":
            lvl = num_levels - 1 - lvl
        leaf = leaf.replace("nin_shortcut", "conv_shortcut")
        return f"{side}.{kind}_blocks.{lvl}.resnets.{j}.{leaf}"
    if (r := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", rest)):
        return f"{side}.down_blocks.{r.group(1)}.downsamplers.0.conv.{r.group(2)}"
    if (r := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", rest)):
        return f"{side}.up_blocks.{num_levels - 1 - int(r.group(1))}.upsamplers.0.conv.{r.group(2)}"
    if (r := re.fullmatch(r"mid\.block_(\d)\.(.+)", rest)):
        leaf = r.group(2).replace("nin_shortcut", "conv_shortcut")
        return f"{side}.mid_block.resnets.{int(r.group(1)) - 1}.{leaf}"
    if (r := re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest)):
        leaf = VAE_ATTN_LEAVES.get(r.group(1))
        return f"{side}.mid_block.attentions.0.{leaf}.{r.group(2)}" if leaf else None
    return None


def vae_component(tf: TensorFile, prefix: str, keys: list[str], *, ldm: bool, origin: str) -> Component:
    """A VAE component from LDM-named keys (ldm=True) or diffusers-named keys, each under `prefix`."""
    tensors: dict[str, LazyTensor] = {}
    if ldm:
        n = len(_ids([k[len(prefix):] for k in keys], "encoder.down"))
        for k in keys:
            new = ldm_vae_to_diffusers(k[len(prefix):], n)
            if new is None:
                raise FormatError(f"{origin}: key {k!r} is not part of an SD KL-VAE")
            lt = LazyTensor(tf, k)
            tensors[new] = _squeeze_1x1(lt) if ".attentions." in new else lt
    else:
        for k in keys:
            new = k[len(prefix):]
            m = re.fullmatch(r"(.*\.attentions\.0\.)(\w+)\.(weight|bias)", new)
            if m and m.group(2) in VAE_ATTN_LEAVES:
                new = f"{m.group(1)}{VAE_ATTN_LEAVES[m.group(2)]}.{m.group(3)}"
            lt = LazyTensor(tf, k)
            tensors[new] = _squeeze_1x1(lt) if ".attentions." in new else lt
    return Component("vae", infer_vae_config({k: v.shape for k, v in tensors.items()}, origin), tensors, origin)


def infer_vae_config(shapes: dict[str, tuple], path: str) -> dict:
    """Diffusers AutoencoderKL config from diffusers-named VAE shapes."""
    keys = list(shapes)
    levels = _ids(keys, "encoder.down_blocks")
    if not levels or "decoder.conv_in.weight" not in shapes or "encoder.conv_in.weight" not in shapes:
        raise FormatError(f"{path}: no KL-VAE encoder/decoder weights found")
    block_out = []
    for i in levels:
        s = shapes.get(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")
        if s is None:
            raise FormatError(f"{path}: VAE encoder level {i} has no resnets")
        block_out.append(s[0])
    lpb = len(_ids(keys, "encoder.down_blocks.0.resnets"))
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(block_out),
        "up_block_types": ["UpDecoderBlock2D"] * len(block_out),
        "block_out_channels": block_out,
        "layers_per_block": lpb,
        "act_fn": "silu",
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "norm_num_groups": 32,
        # LDM always has it; diffusers' mid_block_add_attention=False models export without it
        "mid_block_add_attention": any(".mid_block.attentions." in k for k in keys),
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


# ---------------------------------------------------------------------------------- text models

def clip_config(shapes: dict[str, tuple], family: str, path: str) -> dict:
    """transformers CLIPTextConfig dict from CLIPTextModel-named shapes (`text_model.` prefix)."""
    try:
        vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
        max_pos = shapes["text_model.embeddings.position_embedding.weight"][0]
        inter = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise FormatError(f"{path}: text encoder has no {e.args[0]}") from None
    layers = len(_ids(list(shapes), "text_model.encoder.layers"))
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": max_pos,
        "hidden_act": "gelu" if family == "sd2" else "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        # As in the diffusers SD 1.x/2.x text_encoder/config.json files.
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "projection_dim": 512 if family == "sd2" else 768,
    }


def hf_clip_tensors(tf: TensorFile, prefix: str, keys: list[str]) -> dict[str, LazyTensor]:
    out = {}
    for k in keys:
        name = k[len(prefix):]
        if not name.startswith("text_model."):
            name = "text_model." + name  # pre-2022 transformers layout
        if name == "text_model.embeddings.position_ids":
            continue  # a constant arange, non-persistent in current transformers
        out[name] = LazyTensor(tf, k)
    return out


_OPENCLIP_LEAVES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def openclip_tensors(tf: TensorFile, prefix: str, keys: list[str], path: str) -> dict[str, LazyTensor]:
    """OpenCLIP text tower -> CLIPTextModel names, dropping the last resblock (SD 2 uses the
    penultimate layer), text_projection and logit_scale."""
    names = [k[len(prefix):] for k in keys]
    blocks = _ids(names, "transformer.resblocks")
    if not blocks:
        raise FormatError(f"{path}: OpenCLIP text tower has no transformer.resblocks")
    last = blocks[-1]
    out: dict[str, LazyTensor] = {}
    for k, name in zip(keys, names):
        if name == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = LazyTensor(tf, k)
        elif name == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = LazyTensor(tf, k)
        elif name in ("ln_final.weight", "ln_final.bias"):
            out["text_model.final_layer_norm." + name.split(".")[-1]] = LazyTensor(tf, k)
        elif name in ("text_projection", "logit_scale", "attn_mask"):
            continue
        elif (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", name)) or (
            m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(attn)\.in_proj_(weight|bias)", name)
        ):
            i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
            if i == last:
                continue
            base = f"text_model.encoder.layers.{i}"
            if name.endswith(f"in_proj_{kind}"):
                rows = tf.shape(k)[0]
                if rows % 3:
                    raise FormatError(f"{path}: {k} has {rows} rows, not a fused q/k/v projection")
                d = rows // 3
                for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"{base}.self_attn.{p}.{kind}"] = LazyTensor(tf, k, rows=(j * d, (j + 1) * d))
            elif mod in _OPENCLIP_LEAVES:
                out[f"{base}.{_OPENCLIP_LEAVES[mod]}.{kind}"] = LazyTensor(tf, k)
            else:
                raise FormatError(f"{path}: unknown OpenCLIP text key {k!r}")
        else:
            raise FormatError(f"{path}: unknown OpenCLIP text key {k!r}")
    return out


# ----------------------------------------------------------------------------------- the reader

def _prediction_from_yaml(path: str) -> tuple[str, str] | None:
    stem = os.path.splitext(path)[0]
    for ext in (".yaml", ".yml"):
        y = stem + ext
        if os.path.isfile(y):
            with open(y, encoding="utf-8", errors="replace") as f:
                text = f.read()
            is_v = re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", text, re.M) is not None
            return ("v_prediction" if is_v else "epsilon"), f"from {os.path.basename(y)}"
    return None


def _merge(inferred: dict, override: dict | None) -> dict:
    out = dict(inferred)
    out.update(override or {})
    return out


def open_single_file(path: str, config: dict | None = None) -> ModelSource:
    """Read an LDM single-file checkpoint lazily (see the module docstring for the rules)."""
    config = dict(config or {})
    tf = TensorFile(path)
    keys = tf.keys()
    for prefix, what in _FOREIGN:
        if any(k.startswith(prefix) for k in keys):
            raise FormatError(f"{path}: this is {what}; fastdiff reads SD 1.x / 2.x checkpoints only")
    groups: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("clip", CLIP_PREFIX),
                             ("openclip", OPENCLIP_PREFIX)):
            if k.startswith(prefix):
                groups[name].append(k)
                break
    if not groups["unet"]:
        if any(k.startswith(("encoder.", "decoder.")) for k in keys):
            raise FormatError(f"{path}: a standalone VAE, not a full checkpoint (load it with open_vae)")
        sample = ", ".join(keys[:3])
        raise FormatError(f"{path}: no {UNET_PREFIX}* keys: not a Stable Diffusion checkpoint (keys: {sample}, ...)")

    notes = []
    ignored = len(keys) - sum(len(v) for v in groups.values())
    if ignored:
        notes.append(f"{ignored} tensors ignored (EMA copies, schedule buffers, ...)")
    unet_shapes = {k[len(UNET_PREFIX):]: tf.shape(k) for k in groups["unet"]}

    # Family: the text tower decides; without one, the UNet's context width / projection kind.
    if groups["openclip"]:
        family, why = "sd2", "OpenCLIP text encoder (cond_stage_model.model)"
    elif groups["clip"]:
        family, why = "sd1", "CLIP text encoder (cond_stage_model.transformer)"
    else:
        ctx = next((s[1] for k, s in unet_shapes.items() if k.endswith("attn2.to_k.weight")), None)
        lin = any(len(s) == 2 for k, s in unet_shapes.items() if k.endswith("proj_in.weight"))
        family = "sd2" if ctx == 1024 or (ctx != 768 and lin) else "sd1"
        why = f"context dim {ctx}, {'linear' if lin else 'conv'} proj_in (no text encoder in file)"
        notes.append("no text encoder in the file")
    family = config.get("family", family)

    # UNet
    ucfg = _merge(infer_unet_config(unet_shapes, family, path), config.get("unet"))
    table = unet_module_table(ucfg)
    unet_t = {}
    for k in groups["unet"]:
        new = _rename(k[len(UNET_PREFIX):], table)
        if new is None:
            raise FormatError(f"{path}: key {k!r} does not belong to an SD UNet with layers_per_block="
                              f"{ucfg['layers_per_block']} and {len(ucfg['block_out_channels'])} levels")
        unet_t[new] = LazyTensor(tf, k)
    unet = Component("unet", ucfg, unet_t, path)

    # Prediction type (see module docstring)
    explicit = config.get("prediction_type") or (config.get("scheduler") or {}).get("prediction_type")
    if explicit:
        pred, rule = explicit, "explicit config"
    elif (y := _prediction_from_yaml(path)) is not None:
        pred, rule = y
    elif family == "sd2" and ucfg["in_channels"] == 4:
        pred, rule = "v_prediction", "SD 2.x default rule (non-inpainting -> v); override with config"
    else:
        pred, rule = "epsilon", f"{'SD 2.x inpainting' if family == 'sd2' else 'SD 1.x'} -> epsilon"
    if pred not in ("epsilon", "v_prediction"):
        raise FormatError(f"prediction_type must be 'epsilon' or 'v_prediction', got {pred!r}")
    if pred == "v_prediction" and "unet" not in config:
        ucfg["sample_size"] = 96  # 768-v
    if family == "sd2" and "upcast_attention" not in (config.get("unet") or {}):
        ucfg["upcast_attention"] = pred == "v_prediction"  # as diffusers' SD 2.1-v config

    vae = None
    if groups["vae"]:
        vae = vae_component(tf, VAE_PREFIX, groups["vae"], ldm=True, origin=path)
        vae.config = _merge(vae.config, config.get("vae"))
    else:
        notes.append("no VAE in the file")

    text = None
    if groups["clip"]:
        tt = hf_clip_tensors(tf, CLIP_PREFIX, groups["clip"])
        text = Component("text_encoder", clip_config({k: v.shape for k, v in tt.items()}, family, path), tt, path)
    elif groups["openclip"]:
        tt = openclip_tensors(tf, OPENCLIP_PREFIX, groups["openclip"], path)
        text = Component("text_encoder", clip_config({k: v.shape for k, v in tt.items()}, family, path), tt, path)
    if text is not None:
        text.config = _merge(text.config, config.get("text_encoder"))

    sched = _merge(SD_SCHEDULER, config.get("scheduler"))
    sched["prediction_type"] = pred
    max_len = text.config["max_position_embeddings"] if text else 77
    tokenizer = {"kind": "clip", "pad_token_id": CLIP_PAD[family], "model_max_length": max_len, "path": None}
    tokenizer.update(config.get("tokenizer") or {})
    src = ModelSource(path=path, format=tf.format_name, family=family, unet=unet, vae=vae, text_encoder=text,
                      scheduler=sched, tokenizer=tokenizer, prediction_rule=rule,
                      notes=[f"family from {why}"] + notes, tensor_count=len(keys), file_dtypes=_dtype_counts(tf))
    return src


def _dtype_counts(tf: TensorFile) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for k in tf.keys():
        out[str(tf.dtype(k)).replace("torch.", "")] += 1
    return dict(out)


def open_vae(path: str, config: dict | None = None) -> Component:
    """A standalone VAE file: LDM keys (encoder.down.N..., optionally under first_stage_model.)
    or diffusers keys (encoder.down_blocks.N...). `config` updates the inferred VAE config."""
    tf = TensorFile(path)
    keys = [k for k in tf.keys() if not k.startswith(("model_ema.", "loss."))]
    prefix = ""
    for p in (VAE_PREFIX, "vae."):
        if any(k.startswith(p) for k in keys):
            prefix = p
    keys = [k for k in keys if k.startswith(prefix)]
    names = [k[len(prefix):] for k in keys]
    if any(n.startswith("model.diffusion_model.") for n in tf.keys()) and not prefix:
        raise FormatError(f"{path}: a full checkpoint without VAE weights, not a VAE")
    if any(n.startswith(("encoder.down.", "decoder.up.")) for n in names):
        ldm = True
    elif any(n.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for n in names):
        ldm = False
    else:
        raise FormatError(f"{path}: no VAE encoder/decoder keys (encoder.down.* or encoder.down_blocks.*): not a VAE")
    keys = [k for k, n in zip(keys, names) if n.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))]
    comp = vae_component(tf, prefix, keys, ldm=ldm, origin=path)
    comp.config = _merge(comp.config, config)
    return comp
