"""Write a small randomly initialised SD 1.x-architecture model as a diffusers folder.

    python scripts/random_model.py OUT_DIR [--size 256] [--seed 0]

A model of any native size for format and speed checks (the trained model that ships is
fastdiff/data/shapes-model, 64x64): it exercises every part (CLIP tokenizer and text encoder,
cross-attention UNet, KL VAE, sampler, PNG writer) and produces noise-like pictures. Built
with fastdiff's own model code (torch's default initialisation, seeded) by
fastdiff.random_model.write_random_model, saved fp32 safetensors in the layout
`save_pretrained` writes, so diffusers can open it too.
"""
from __future__ import annotations

import argparse
import sys


def configs(size: int) -> dict:
    latent = size // 8
    unet = {
        "_class_name": "UNet2DConditionModel", "sample_size": latent, "in_channels": 4, "out_channels": 4,
        "layers_per_block": 1, "block_out_channels": [64, 128, 128], "cross_attention_dim": 128,
        "attention_head_dim": 8, "norm_num_groups": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    vae = {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "layers_per_block": 1, "block_out_channels": [32, 32, 64, 64], "norm_num_groups": 32,
        "sample_size": size, "scaling_factor": 0.18215,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    text = {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
        "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, "projection_dim": 128,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text}


def write(out: str, size: int = 256, seed: int = 0) -> str:
    from fastdiff.random_model import write_random_model

    if size % 64:
        raise SystemExit(f"--size must be a multiple of 64, got {size}")
    return write_random_model(out, configs(size), seed=seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write (created)")
    p.add_argument("--size", type=int, default=256, help="native image size in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    a = p.parse_args(argv)
    print(write(a.out, a.size, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
