"""diffusers pipeline folders: model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/,
each model with config.json and .safetensors (or .bin pickles, read with weights_only=True;
sharded *.index.json and fp16 variants too)."""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict

from .common import CLIP_PAD, SD_SCHEDULER, VAE_ATTN_LEAVES
from .files import FormatError, TensorFile
from .source import Component, LazyTensor, ModelSource, _squeeze_1x1

_WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
_BIN = {"diffusion_pytorch_model": "diffusion_pytorch_model", "model": "pytorch_model"}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


def _weight_files(folder: str, kind: str) -> list[str]:
    stem = _WEIGHTS[kind]
    candidates = []
    for variant in ("", ".fp16"):
        for base, ext in ((stem, ".safetensors"), (_BIN[stem], ".bin")):
            candidates.append(os.path.join(folder, f"{base}{variant}{ext}"))
    for c in candidates:
        if os.path.isfile(c):
            return [c]
        idx = c + ".index.json"
        if os.path.isfile(idx):
            wm = _read_json(idx).get("weight_map")
            if not isinstance(wm, dict):
                raise FormatError(f"{idx}: no weight_map")
            return [os.path.join(folder, f) for f in dict.fromkeys(wm.values())]
    names = ", ".join(os.path.basename(c) for c in candidates[:2])
    raise FormatError(f"{folder}: no weights found (looked for {names}, .bin, fp16 variants, *.index.json)")


def _rename(kind: str, key: str) -> str | None:
    if kind == "text_encoder":
        if not key.startswith("text_model."):
            key = "text_model." + key  # transformers >= 5 writes CLIPTextModel without the prefix
        return None if key == "text_model.embeddings.position_ids" else key
    if kind == "vae":
        m = re.fullmatch(r"(.*\.attentions\.0\.)(\w+)\.(weight|bias)", key)
        if m and m.group(2) in VAE_ATTN_LEAVES and m.group(2) != "norm":
            return f"{m.group(1)}{VAE_ATTN_LEAVES[m.group(2)]}.{m.group(3)}"
    return key


def open_component_folder(folder: str, kind: str, config: dict | None = None) -> Component:
    """One model folder (config.json + weights) as a Component with diffusers/transformers names."""
    if not os.path.isdir(folder):
        raise FormatError(f"{folder}: missing {kind} folder")
    cfg = _read_json(os.path.join(folder, "config.json"))
    cfg.update(config or {})
    tensors: dict[str, LazyTensor] = {}
    for wf in _weight_files(folder, kind):
        tf = TensorFile(wf)
        for k in tf.keys():
            new = _rename(kind, k)
            if new is None:
                continue
            lt = LazyTensor(tf, k)
            tensors[new] = _squeeze_1x1(lt) if kind == "vae" and ".attentions." in new else lt
    return Component(kind, cfg, tensors, folder)


def _pad_token_id(tok_dir: str) -> int | None:
    pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(tok_dir, name)
        if os.path.isfile(p):
            v = _read_json(p).get("pad_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                pad = v
                break
    if pad is None:
        return None
    vocab = os.path.join(tok_dir, "vocab.json")
    if os.path.isfile(vocab):
        return _read_json(vocab).get(pad)
    return {"<|endoftext|>": 49407, "!": 0}.get(pad)


def open_diffusers(folder: str, config: dict | None = None) -> ModelSource:
    config = dict(config or {})
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise FormatError(f"{folder}: a directory without model_index.json is not a diffusers pipeline folder")
    index = _read_json(index_path)
    comps = {}
    for kind in ("unet", "vae", "text_encoder"):
        sub = os.path.join(folder, kind)
        if kind in index or os.path.isdir(sub):
            comps[kind] = open_component_folder(sub, kind, config.get(kind))
    if "unet" not in comps:
        raise FormatError(f"{folder}: model_index.json lists no unet")
    unet, te = comps["unet"], comps.get("text_encoder")

    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    sched = _read_json(sched_path) if os.path.isfile(sched_path) else dict(SD_SCHEDULER)
    sched.setdefault("prediction_type", "epsilon")
    rule = "scheduler_config.json" if os.path.isfile(sched_path) else "default (no scheduler folder)"
    sched.update(config.get("scheduler") or {})
    if config.get("prediction_type"):
        sched["prediction_type"] = config["prediction_type"]
    if config.get("prediction_type") or (config.get("scheduler") or {}).get("prediction_type"):
        rule = "explicit config"

    sd2 = (te is not None and te.config.get("hidden_act") == "gelu") or unet.config.get("cross_attention_dim") == 1024
    family = config.get("family", "sd2" if sd2 else "sd1")
    tok_dir = os.path.join(folder, "tokenizer")
    tokenizer = {"kind": "clip", "pad_token_id": CLIP_PAD[family], "model_max_length": 77, "path": None}
    if os.path.isdir(tok_dir):
        tokenizer["path"] = tok_dir
        pad = _pad_token_id(tok_dir)
        if pad is not None:
            tokenizer["pad_token_id"] = pad
        tc = os.path.join(tok_dir, "tokenizer_config.json")
        if os.path.isfile(tc):
            tokenizer["model_max_length"] = _read_json(tc).get("model_max_length", 77)
    tokenizer.update(config.get("tokenizer") or {})

    files: dict[str, TensorFile] = {}
    for c in comps.values():
        for lt in c.tensors.values():
            files[lt.file.path] = lt.file
    dtypes: dict[str, int] = defaultdict(int)
    for tf in files.values():
        for k in tf.keys():
            dtypes[str(tf.dtype(k)).replace("torch.", "")] += 1
    return ModelSource(
        path=folder, format="diffusers folder", family=family, unet=unet, vae=comps.get("vae"), text_encoder=te,
        scheduler=sched, tokenizer=tokenizer, prediction_rule=rule,
        notes=[f"family from {'text encoder / context width' if 'family' not in config else 'explicit config'}"],
        tensor_count=sum(len(tf.keys()) for tf in files.values()), file_dtypes=dict(dtypes),
    )
