"""Random SD models, for format checks, tests and benchmarks (no weights can be downloaded).

    write_random_model(out, {"unet": {...}, "vae": {...}, "text_encoder": {...}}, seed=0)
    randomize_(module, seed)   # re-draw every parameter away from its default

`write_random_model` builds fastdiff's own UNet, VAE and CLIP text encoder from the given
configs (torch's default initialisation, seeded) and writes them as a diffusers pipeline folder
in the layout `save_pretrained` writes (config.json + safetensors, a CLIP tokenizer/ folder,
scheduler_config.json, model_index.json), so fastdiff and diffusers open the same weights.
"""
from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

EULER = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon"}

_CLASS = {"unet": {"_class_name": "UNet2DConditionModel"}, "vae": {"_class_name": "AutoencoderKL"},
          "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}}
_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
          "text_encoder": "model.safetensors"}


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter so that no weight is at its (often zero/one) default: matrices
    and kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2), biases N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def write_random_model(out: str, configs: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                       scheduler: dict | None = None) -> str:
    """A diffusers StableDiffusionPipeline folder at `out` with random weights stored as `dtype`.
    `configs`: the "unet", "vae" and "text_encoder" config dicts (diffusers / transformers keys);
    `scheduler`: its scheduler_config.json (default EULER)."""
    from fastdiff.models.clip import CLIPTextEncoder
    from fastdiff.models.unet import UNet2DCondition
    from fastdiff.models.vae import AutoencoderKL
    from fastdiff.tokenizer import write_clip_vocab
    from safetensors.torch import save_file

    build = {"unet": UNet2DCondition, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder}
    torch.manual_seed(seed)
    for name in ("unet", "vae", "text_encoder"):  # one at a time: SD 1.5's UNet alone is 3.4 GB in fp32
        cfg = {**_CLASS[name], **configs[name]}
        sd = {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous()
              for k, v in build[name](cfg).state_dict().items()}
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        save_file(sd, os.path.join(d, _FILES[name]), metadata={"format": "pt"})
        del sd
    write_clip_vocab(os.path.join(out, "tokenizer"))
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    sched = scheduler or EULER
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"],
                   "scheduler": ["diffusers", sched.get("_class_name", "EulerDiscreteScheduler")],
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}, f, indent=2)
    return out
