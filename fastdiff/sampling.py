"""Noise schedules and samplers: the Python face of the C++ sampling core (``fastdiff._core``).

k-diffusion semantics throughout: sigma space, ``x_t = x0 + sigma * eps`` (so ``x`` starts at
scale ``sigmas[0]``) and a denoiser ``denoise(x, sigma: float) -> x0``. The step order, the
multistep history and every coefficient live in C++; tensors are only handed to callbacks:
``denoise``, the noise sampler, ``callback`` and ``update(coeffs, tensors) -> sum c_i t_i``
(default ``fastdiff.ops.lincomb``), which forms every new tensor, once per model evaluation.
The loop never reads a tensor value, so it adds no host synchronisation; the only one is the
NaN/inf check on the result, after the loop.

Samplers and what their parity tests compare against (tests/sampling_reference.py):

====================  ===========================================================  ==========
name                  algorithm                                                     reference
====================  ===========================================================  ==========
euler                 Karras et al. 2022, Alg. 2 (no churn)                         k-diffusion
euler_ancestral       Euler + ancestral noise (eta)                                 k-diffusion
heun                  Karras et al. 2022, Alg. 2 (Heun; Euler on the step to 0)     k-diffusion
dpm_2                 DPM-Solver-2 style, midpoint in log sigma                     k-diffusion
dpm_2_ancestral       dpm_2 + ancestral noise                                       k-diffusion
lms                   linear multistep, order 4, Lagrange basis integrated          k-diffusion
dpmpp_2s_ancestral    DPM-Solver++(2S) + ancestral noise                            k-diffusion
dpmpp_sde             DPM-Solver++ SDE, r = 1/2                                     k-diffusion
dpmpp_2m              DPM-Solver++(2M)                                              k-diffusion
dpmpp_2m_sde          DPM-Solver++(2M) SDE, midpoint                                k-diffusion
dpmpp_3m_sde          DPM-Solver++(3M) SDE                                          k-diffusion
ddim                  DDIM, eta = 0 (= euler in sigma space, as ComfyUI)           diffusers DDIMScheduler
ddpm                  DDPM posterior, fixed-small variance                          diffusers DDPMScheduler
uni_pc                UniPC, order 2, B(h) = expm1(-h) ("bh2"), data prediction     diffusers UniPCMultistepScheduler
lcm                   LCM: x = D, then re-noise to the next sigma                   diffusers LCMScheduler
====================  ===========================================================  ==========

Differences from the references, on purpose:

- ``dpmpp_sde``, ``dpmpp_2m_sde`` and ``dpmpp_3m_sde`` draw independent noise per call by
  default; k-diffusion uses a ``BrownianTreeNoiseSampler`` for them. Pass any
  ``noise_sampler(sigma, sigma_next)`` (e.g. a Brownian tree) to get k-diffusion's behaviour.
- ``ddim`` ignores ``eta``: DDIM with eta > 0 is exactly ``euler_ancestral`` with that eta.
  ``ddpm`` is also what ``euler_ancestral`` gives with eta = 1 (same maths, kept for the name).
- ``lcm``: the consistency boundary condition (c_skip, c_out) belongs in the LCM denoiser; the
  sampler is ComfyUI's (x = D + sigma_next * noise), diffusers' LCMScheduler with c_skip = 0.
- ``uni_pc`` follows diffusers (order 2, bh2, corrector on, lower-order final steps);
  ComfyUI's ``uni_pc`` is order 3 bh1 and stops at sigma 0.001.
- ``lms`` integrates the Lagrange basis exactly (Gauss-Legendre), k-diffusion uses
  ``scipy.integrate.quad``; its update combines up to 8 tensors (the (x, D) history pairs).
- ``s_noise`` scales every fresh noise draw (also for ``ddpm`` and ``lcm``).
- Unlike ComfyUI, no sampler calls the noise sampler when the noise would be multiplied by 0.

Schedules (``sigmas()``), ComfyUI / A1111 definitions: ``normal`` (uniform in training
timestep, log-sigma interpolation), ``karras`` (Karras et al. 2022, rho), ``exponential``
(uniform in log sigma), ``sgm_uniform`` (normal with steps + 1 points, last dropped), ``simple``
(every 1000/steps-th training sigma), ``ddim_uniform`` (timesteps 1 + k * (1000 // steps);
ComfyUI may return more than ``steps`` here, we never do), ``beta`` (Beta(0.6, 0.6) quantiles of
the timesteps; equal rounded timesteps are merged, so very large ``steps`` can give fewer).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from fastdiff import _core

SAMPLERS: tuple[str, ...] = tuple(_core.SAMPLERS)
SCHEDULES: tuple[str, ...] = tuple(_core.SCHEDULES)

__all__ = ["SAMPLERS", "SCHEDULES", "sigmas", "sample", "default_alphas_cumprod"]


def default_alphas_cumprod() -> torch.Tensor:
    """SD 1.x/2.x training schedule: scaled_linear betas 0.00085 -> 0.012, 1000 steps (float64)."""
    return torch.tensor(_core.default_alphas_cumprod(), dtype=torch.float64)


def _floats(values, what: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        if values.ndim != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(values.shape)}")
        return values.detach().to("cpu", torch.float64).tolist()
    return [float(v) for v in values]


def sigmas(
    schedule: str,
    steps: int,
    alphas_cumprod=None,
    *,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: float = 7.0,
) -> torch.Tensor:
    """``steps + 1`` decreasing sigmas ending in 0 (float64), for ``schedule`` in ``SCHEDULES``.

    ``alphas_cumprod`` (the model's training schedule) defaults to SD's; ``sigma_min`` /
    ``sigma_max`` default to the model's smallest / largest sigma (``karras``, ``exponential``,
    ``normal``, ``sgm_uniform``); ``rho`` is Karras' exponent.
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"steps must be an int, got {steps!r}")
    ac = None if alphas_cumprod is None else _floats(alphas_cumprod, "alphas_cumprod")
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    out = _core.sigmas(schedule, steps, ac, sigma_min or 0.0, sigma_max or 0.0, float(rho))
    return torch.tensor(out, dtype=torch.float64)


def _default_noise(x: torch.Tensor, generator: Optional[torch.Generator]) -> Callable:
    def noise(sigma: float, sigma_next: float) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    return noise


def sample(
    denoise: Callable,
    x: torch.Tensor,
    sigmas,
    sampler: str,
    *,
    noise_sampler: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable] = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    update: Optional[Callable] = None,
) -> torch.Tensor:
    """Run ``sampler`` (one of ``SAMPLERS``) from ``x`` (at scale ``sigmas[0]``) down ``sigmas``.

    ``denoise(x, sigma: float) -> x0``; ``noise_sampler(sigma, sigma_next) -> standard normal
    tensor like x`` (default ``torch.randn`` with ``generator``); ``callback({i, x, sigma,
    denoised})`` once per step; ``eta`` / ``s_noise`` scale the fresh noise of the ancestral and
    SDE samplers; ``update(coeffs, tensors)`` defaults to ``fastdiff.ops.lincomb``.
    ``sigmas`` must be strictly decreasing and >= 0; it need not end in 0.
    Raises ValueError on bad input and FloatingPointError if the result holds NaN or inf.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    sig = _floats(sigmas, "sigmas")
    if update is None:
        from fastdiff import ops

        update = ops.lincomb
    if noise_sampler is None:
        noise_sampler = _default_noise(x, generator)
    out = _core.sample(sampler, denoise, x, sig, noise_sampler, update, callback, float(eta), float(s_noise))
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError(
            f"sampler {sampler!r} produced NaN or inf after {len(sig) - 1} steps "
            f"(sigmas {sig[0]:.4g} -> {sig[-1]:.4g})"
        )
    return out
