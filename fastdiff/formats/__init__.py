"""Checkpoint readers. Each produces plain state dicts (diffusers key names) plus a config;
models never import this package.

    src = open_model(path, config=None)     # diffusers folder or LDM single file -> ModelSource
    load_into(unet, src.unet, device, dtype)  # stream tensors into a built module
    src = src.with_vae(open_vae(vae_path))
    hn = read_hypernetwork(path)            # HypernetworkFile(name, config, state_dicts)
    emb = load_embedding(path)              # Embedding(name, vectors [n, dim])
    print(describe(path))
"""
from __future__ import annotations

from .embedding import Embedding, check_embedding_width, load_embedding
from .files import FormatError, TensorFile, load_pickle, sniff
from .hypernetwork import HypernetworkFile, read_hypernetwork
from .source import Component, LazyTensor, ModelSource, load_into

__all__ = [
    "FormatError", "open_model", "open_vae", "describe", "load_into", "ModelSource", "Component",
    "LazyTensor", "TensorFile", "load_pickle", "sniff", "HypernetworkFile", "read_hypernetwork",
    "Embedding", "load_embedding", "check_embedding_width",
]


def open_model(path: str, config: dict | None = None) -> ModelSource:
    """A whole SD 1.x/2.x model: a diffusers pipeline folder or an LDM single-file checkpoint.
    `config` overrides what was read or inferred: {'prediction_type': ..., 'family': 'sd1'|'sd2',
    'unet': {...}, 'vae': {...}, 'text_encoder': {...}, 'scheduler': {...}, 'tokenizer': {...}}."""
    import os

    if os.path.isdir(path):
        from .diffusers_folder import open_diffusers

        return open_diffusers(path, config)
    from .ldm import open_single_file

    return open_single_file(path, config)


def open_vae(path: str, config: dict | None = None) -> Component:
    """A standalone VAE (.safetensors/.pt/.ckpt with LDM or diffusers keys, or a diffusers vae/
    folder) as a Component to pass to ModelSource.with_vae or load_into."""
    import os

    if os.path.isdir(path):
        from .diffusers_folder import open_component_folder

        return open_component_folder(path, "vae", config)
    from .ldm import open_vae as _open_vae

    return _open_vae(path, config)


def _fmt_counts(d: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))


def describe(path: str, config: dict | None = None) -> str:
    """What fastdiff detects in a model (for `fastdiff info PATH`)."""
    src = open_model(path, config)
    lines = [
        f"path:        {src.path}",
        f"format:      {src.format}, {src.tensor_count} tensors ({_fmt_counts(src.file_dtypes)})",
        f"family:      {src.family_label}",
        f"prediction:  {src.prediction_type} ({src.prediction_rule})",
    ]
    u = src.unet.config
    inch = u.get("in_channels", 4)
    kind = {4: "", 9: " (inpainting)", 8: " (instruct-pix2pix)"}.get(inch, "")
    heads = u.get("attention_head_dim")
    if src.family == "sd2" or isinstance(heads, (list, tuple)):
        hs = heads if isinstance(heads, (list, tuple)) else [heads] * len(u["block_out_channels"])
        heads_txt = f"heads {list(hs)} per level"
    else:
        heads_txt = f"heads {heads}"
    attn = ["attn" if t.startswith("CrossAttn") else "-" for t in u.get("down_block_types", [])]
    lines += [
        f"unet:        in-channels {inch}{kind}, out-channels {u.get('out_channels', 4)}, "
        f"widths {list(u['block_out_channels'])}, layers per block {u.get('layers_per_block')}, "
        f"transformer depth {u.get('transformer_layers_per_block', 1)}, {heads_txt}, "
        f"context dim {u.get('cross_attention_dim')}, "
        f"{'linear' if u.get('use_linear_projection') else 'conv'} proj_in, cross-attention {attn}, "
        f"{src.unet.num_params() / 1e6:.1f}M params",
    ]
    if src.text_encoder is not None:
        t = src.text_encoder.config
        lines.append(
            f"text:        {'OpenCLIP (as CLIPTextModel)' if src.family == 'sd2' else 'CLIP'} "
            f"{t.get('num_hidden_layers')} layers, width {t.get('hidden_size')}, heads {t.get('num_attention_heads')}, "
            f"{t.get('hidden_act')}, vocab {t.get('vocab_size')}, max length {t.get('max_position_embeddings')}, "
            f"{src.text_encoder.num_params() / 1e6:.1f}M params"
        )
    else:
        lines.append("text:        none in file")
    if src.vae is not None:
        v = src.vae.config
        lines.append(
            f"vae:         KL, widths {list(v.get('block_out_channels', []))}, layers per block "
            f"{v.get('layers_per_block')}, latent channels {v.get('latent_channels')}, "
            f"scaling factor {v.get('scaling_factor')}, {src.vae.num_params() / 1e6:.1f}M params"
        )
    else:
        lines.append("vae:         none in file")
    lines.append(f"tokenizer:   CLIP BPE, pads with id {src.tokenizer.get('pad_token_id')}"
                 + (f" ({src.tokenizer['path']})" if src.tokenizer.get("path") else ""))
    for n in src.notes:
        lines.append(f"note:        {n}")
    return "\n".join(lines)
