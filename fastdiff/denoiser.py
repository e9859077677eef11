"""The model as a k-diffusion denoiser: `denoise(x, sigma) -> x0` around an epsilon- or
v-predicting UNet trained on discrete DDPM timesteps (k-diffusion's CompVisDenoiser and
CompVisVDenoiser, sigma_data = 1).

Everything that depends on sigma alone is computed on the host in float64 from a Python float,
so the loop never waits on the device.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def scaled_linear_alphas_cumprod(beta_start=0.00085, beta_end=0.012, steps=1000) -> np.ndarray:
    """SD's training schedule: betas linear in sqrt space."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


class DiscreteSigmas:
    """The model's 1000 training sigmas and the log-linear map between sigma and timestep."""

    def __init__(self, alphas_cumprod):
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        self.alphas_cumprod = ac
        self.sigmas = np.sqrt((1.0 - ac) / ac)  # increasing with t
        self.log_sigmas = np.log(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        # Interpolate t linearly in log sigma between the two neighbouring training sigmas.
        ls = math.log(max(sigma, 1e-10))
        ls_all = self.log_sigmas
        low = int(np.searchsorted(ls_all, ls, side="right")) - 1
        low = min(max(low, 0), len(ls_all) - 2)
        lo, hi = ls_all[low], ls_all[low + 1]
        w = min(max((lo - ls) / (lo - hi), 0.0), 1.0)
        return (1.0 - w) * low + w * (low + 1)


class Denoiser:
    """`denoise(x, sigma) -> x0` with classifier-free guidance folded into one fused update.

    cond/uncond contexts are [B, L, dim]; with guidance_scale == 1 the uncond half is skipped.
    The final combination x0 = c_skip*x + c_out*(uncond + g*(cond - uncond)) is a single
    `lincomb` over (x, uncond_out, cond_out).
    """

    def __init__(self, unet, schedule: DiscreteSigmas, prediction_type: str, cond, uncond,
                 guidance_scale: float, lincomb, model_dtype=None, extra_channels=None):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.g = float(guidance_scale)
        self.lincomb = lincomb
        self.model_dtype = model_dtype or cond.dtype
        self.extra = extra_channels  # [B, C, h, w] concatenated after x (inpainting UNets)
        if self.g == 1.0:
            self.context = cond
        else:
            self.context = torch.cat([uncond, cond])
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls += 1
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        t = self.schedule.sigma_to_t(sigma)
        x_in = (x * c_in).to(self.model_dtype)  # [B, 4, h, w]
        if self.extra is not None:
            x_in = torch.cat([x_in, self.extra.to(self.model_dtype)], dim=1)
        if self.g != 1.0:
            x_in = torch.cat([x_in, x_in])
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.float32, device=x.device)
        out = self.unet(x_in, t_in, self.context).to(x.dtype)
        if self.prediction_type == "epsilon":
            c_skip, c_out = 1.0, -sigma
        else:
            c_skip = 1.0 / (sigma * sigma + 1.0)
            c_out = -sigma / math.sqrt(sigma * sigma + 1.0)
        if self.g == 1.0:
            return self.lincomb([c_skip, c_out], [x, out])
        uncond_out, cond_out = out.chunk(2)
        return self.lincomb([c_skip, c_out * (1.0 - self.g), c_out * self.g], [x, uncond_out, cond_out])
