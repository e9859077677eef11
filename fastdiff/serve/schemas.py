"""Request and response bodies of the A1111 API (modules/api/models.py of the web UI), as
pydantic models. Every field A1111 accepts is here with A1111's default, so clients that send
whole A1111 bodies are understood; the fields fastdiff cannot honour are listed in
UNSUPPORTED with the values that mean "off" — any other value is a 422 naming the field.
Fields A1111 does not know are ignored, as A1111 ignores them."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Txt2ImgRequest(_Body):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: a random seed; image i of the request gets seed + i")
    sampler_name: Optional[str] = Field(None, description='an A1111 name ("Euler a", "DPM++ 2M Karras") or a fastdiff one')
    sampler_index: str = Field("Euler", description="the older field for the sampler, used when sampler_name is empty")
    scheduler: Optional[str] = Field(None, description='"Automatic", "Karras", "Exponential", ... or a fastdiff schedule')
    steps: int = 50
    cfg_scale: float = 7.0
    width: Optional[int] = Field(None, description="pixels; default: the model's native size")
    height: Optional[int] = Field(None, description="pixels; default: the model's native size")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    eta: Optional[float] = Field(None, description="ancestral samplers' eta (default 1)")
    s_noise: float = 1.0
    denoising_strength: Optional[float] = Field(None, description="txt2img: used by hires fix only (not supported)")
    override_settings: dict[str, Any] = Field(default_factory=dict, description="CLIP_stop_at_last_layers, sd_model_checkpoint")
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    disable_extra_networks: bool = False
    # accepted and without effect (A1111: save options, ids, hires settings used only with enable_hr)
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    force_task_id: Optional[str] = None
    subseed: int = -1
    comments: Optional[dict[str, Any]] = None
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstphase_width: int = 0
    firstphase_height: int = 0
    # not supported: must hold A1111's default (see UNSUPPORTED)
    styles: Optional[list[str]] = None
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    s_min_uncond: float = 0.0
    s_churn: float = 0.0
    s_tmax: Optional[float] = None
    s_tmin: float = 0.0
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    enable_hr: bool = False
    script_name: Optional[str] = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: Optional[str] = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(..., description="base64 images (PNG, JPEG, ...; a data: URL prefix is allowed); the first is used")
    denoising_strength: float = Field(0.75, description="how much of the schedule runs from the image, in (0, 1]")
    resize_mode: int = Field(0, description="0: just resize (the only mode supported)")
    include_init_images: bool = False
    image_cfg_scale: Optional[float] = None
    mask_blur: Optional[int] = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    # not supported
    mask: Optional[str] = None
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None


def _off(v) -> bool:
    return v in (None, False, 0, "", [], {}) or v == "None"


# field -> test that the value means "off" (A1111's default or its equivalent)
UNSUPPORTED = {
    "styles": _off,
    "subseed_strength": lambda v: v == 0,
    "seed_resize_from_h": lambda v: v <= 0,
    "seed_resize_from_w": lambda v: v <= 0,
    "restore_faces": _off,
    "tiling": _off,
    "s_min_uncond": lambda v: v == 0,
    "s_churn": lambda v: v == 0,
    "s_tmax": lambda v: v is None or v == 0,
    "s_tmin": lambda v: v == 0,
    "refiner_checkpoint": _off,
    "refiner_switch_at": _off,
    "enable_hr": _off,
    "script_name": _off,
    "script_args": _off,
    "alwayson_scripts": _off,
    "infotext": _off,
    # img2img
    "mask": _off,
    "initial_noise_multiplier": lambda v: v is None or v == 1,
    "latent_mask": _off,
    "resize_mode": lambda v: v == 0,
}


class ImageResponse(BaseModel):
    images: list[str] = Field(description="base64 PNG images; each carries its infotext in a 'parameters' chunk")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string: A1111's generation info (prompt, all_seeds, infotexts, ...)")


class PngInfoRequest(_Body):
    image: str = Field(description="a base64 image (a data: URL prefix is allowed)")


class PngInfoResponse(BaseModel):
    info: str = Field(description="the infotext")
    items: dict[str, Any] = Field(description="the image's other text chunks")
    parameters: dict[str, Any] = Field(description="the infotext parsed into fields, as A1111 parses it")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: Optional[str] = None
    textinfo: Optional[str] = None
    current_task: Optional[str] = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any] = Field(default_factory=dict)


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: float = -1
    need_inner_model: bool = False


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None


class HypernetworkItem(BaseModel):
    name: str
    path: Optional[str] = None
