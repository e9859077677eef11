"""What both checkpoint layouts (diffusers folders, LDM single files) share."""
from __future__ import annotations

# The scheduler every SD 1.x/2.x release ships (diffusers' PNDM config); used when a file
# carries none.
SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

CLIP_PAD = {"sd1": 49407, "sd2": 0}  # SD 1.x pads with <|endoftext|>, SD 2.x (OpenCLIP) with "!"

# LDM / old-diffusers names of the VAE mid-block attention's leaves -> current diffusers names.
VAE_ATTN_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",
                   # diffusers < 0.14 names, still found in standalone diffusers-keyed VAE files
                   "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
