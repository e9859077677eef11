"""Independent float64 references for fastdiff.sampling, written from the papers and from the
k-diffusion / ComfyUI / diffusers semantics; nothing here goes through fastdiff._core.

- Schedules: ComfyUI / A1111 definitions in numpy float64 (scipy for the beta quantiles).
- k-diffusion samplers: plain torch transcriptions (x + d * dt style, as k-diffusion writes them).
- ddim, ddpm, uni_pc, lcm: diffusers' schedulers stepped on our sigmas, fed eps from the denoiser.
- An analytic denoiser: data ~ N(mu, s^2) per element, so E[x0 | x_sigma] is exact.
- A keyed noise sampler: noise(sigma, sigma_next) is a fixed function of its arguments.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# analytic denoiser and noise


class GaussianDenoiser:
    """x0 ~ N(mu, s^2) elementwise, x = x0 + sigma * eps: E[x0 | x] = (mu sigma^2 + s^2 x) / (s^2 + sigma^2)."""

    def __init__(self, shape, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(shape, generator=g, dtype=torch.float64)
        self.s = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        self.calls = []

    def __call__(self, x, sigma):
        sigma = float(sigma)
        self.calls.append(sigma)
        mu, s = self.mu.to(x.dtype), self.s.to(x.dtype)
        return (mu * sigma**2 + s**2 * x) / (s**2 + sigma**2)


class KeyedNoise:
    """Standard normal noise that depends only on (sigma, sigma_next), like a Brownian tree would."""

    def __init__(self, shape, seed=1):
        self.shape, self.seed, self.cache, self.calls = tuple(shape), seed, {}, []

    def __call__(self, sigma, sigma_next):
        key = f"{float(sigma):.9e}/{float(sigma_next):.9e}"
        self.calls.append(key)
        if key not in self.cache:
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()) + 7919 * self.seed)
            self.cache[key] = torch.randn(self.shape, generator=g, dtype=torch.float64)
        return self.cache[key]


def rel_err(out, ref):
    out, ref = torch.as_tensor(out, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


# ---------------------------------------------------------------------------------------------
# schedules (ComfyUI comfy/samplers.py, k-diffusion get_sigmas_*), float64


def sd_alphas_cumprod(n=1000):
    betas = np.linspace(0.00085**0.5, 0.012**0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def ref_sigmas(schedule, steps, alphas_cumprod=None, sigma_min=None, sigma_max=None, rho=7.0):
    ac = sd_alphas_cumprod() if alphas_cumprod is None else np.asarray(alphas_cumprod, dtype=np.float64)
    ms = np.sqrt((1 - ac) / ac)
    n = len(ms)
    log_ms = np.log(ms)
    smin = ms[0] if sigma_min is None else sigma_min
    smax = ms[-1] if sigma_max is None else sigma_max

    def sigma_of_t(t):
        return np.exp(np.interp(t, np.arange(n), log_ms))

    def t_of_sigma(s):
        return np.interp(np.log(s), log_ms, np.arange(n))

    if schedule == "normal":
        sig = sigma_of_t(np.linspace(t_of_sigma(smax), t_of_sigma(smin), steps))
    elif schedule == "sgm_uniform":
        sig = sigma_of_t(np.linspace(t_of_sigma(smax), t_of_sigma(smin), steps + 1)[:-1])
    elif schedule == "karras":
        ramp = np.linspace(0, 1, steps)
        sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    elif schedule == "exponential":
        sig = np.exp(np.linspace(math.log(smax), math.log(smin), steps))
    elif schedule == "simple":
        ss = n / steps
        sig = np.array([ms[-(1 + int(x * ss))] for x in range(steps)])
    elif schedule == "ddim_uniform":
        ss = max(n // steps, 1)
        idx, x = [], 1
        while x < n:  # ComfyUI's loop, then cut to `steps` entries
            idx.append(x)
            x += ss
        sig = ms[np.array(idx[:steps])][::-1]
    elif schedule == "beta":
        from scipy import stats

        ts = 1 - np.linspace(0, 1, steps, endpoint=False)
        ts = np.rint(stats.beta.ppf(ts, 0.6, 0.6) * (n - 1))
        out, last = [], -1
        for t in ts:
            if t != last:
                out.append(ms[int(t)])
            last = t
        sig = np.array(out)
    else:
        raise KeyError(schedule)
    return torch.tensor(np.concatenate([sig, [0.0]]), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# k-diffusion samplers, float64 transcriptions


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def k_euler(model, x, sigmas, **kw):
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def k_euler_ancestral(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], den) * (down - sigmas[i])
        if sigmas[i + 1] > 0 and up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


def k_heun(model, x, sigmas, **kw):
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = to_d(x2, sigmas[i + 1], model(x2, sigmas[i + 1]))
            x = x + (d + d2) / 2 * dt
    return x


def _dpm2_to(model, x, d, sigma, target):
    mid = math.exp(math.log(sigma) + 0.5 * (math.log(target) - math.log(sigma)))
    x2 = x + d * (mid - sigma)
    d2 = to_d(x2, mid, model(x2, mid))
    return x + d2 * (target - sigma)


def k_dpm_2(model, x, sigmas, **kw):
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x = _dpm2_to(model, x, d, sigmas[i], sigmas[i + 1])
    return x


def k_dpm_2_ancestral(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + d * (down - sigmas[i])
        else:
            x = _dpm2_to(model, x, d, sigmas[i], down)
        if up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


def lms_coeff_exact(order, t, i, j):
    """Integral of the Lagrange basis polynomial, by exact polynomial antiderivative."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-t[i - k], 1.0]) / (t[i - j] - t[i - k])
    anti = poly.integ()
    return float(anti(t[i + 1]) - anti(t[i]))


def k_lms(model, x, sigmas, order=4, **kw):
    t = [float(s) for s in sigmas]
    ds = []
    for i in range(len(sigmas) - 1):
        ds.append(to_d(x, sigmas[i], model(x, sigmas[i])))
        ds = ds[-order:]
        cur = min(i + 1, order)
        coeffs = [lms_coeff_exact(cur, t, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def k_dpmpp_2s_ancestral(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    sigma_fn, t_fn = (lambda t: math.exp(-t)), (lambda s: -math.log(s) if s > 0 else math.inf)
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + to_d(x, sigmas[i], den) * (down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(down)
            h = t_next - t
            s = t + 0.5 * h
            x2 = (sigma_fn(s) / sigma_fn(t)) * x - math.expm1(-0.5 * h) * den
            den2 = model(x2, sigma_fn(s))
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - math.expm1(-h) * den2
        if sigmas[i + 1] > 0 and up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


def k_dpmpp_sde(model, x, sigmas, noise, eta=1.0, s_noise=1.0, r=0.5):
    sigma_fn, t_fn = (lambda t: math.exp(-t)), (lambda s: -math.log(s) if s > 0 else math.inf)
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], den) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = ancestral_step(sigma_fn(t), sigma_fn(s), eta)
        s_ = t_fn(sd)
        x2 = (sigma_fn(s_) / sigma_fn(t)) * x - math.expm1(t - s_) * den
        if su > 0:
            x2 = x2 + noise(sigma_fn(t), sigma_fn(s)) * s_noise * su
        den2 = model(x2, sigma_fn(s))
        sd, su = ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
        t_next_ = t_fn(sd)
        den_d = (1 - fac) * den + fac * den2
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - math.expm1(t - t_next_) * den_d
        if su > 0:
            x = x + noise(sigma_fn(t), sigma_fn(t_next)) * s_noise * su
    return x


def k_dpmpp_2m(model, x, sigmas, **kw):
    old = None
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = den
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = t_next - t
            if old is None:
                x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * den
            else:
                r = (t + math.log(sigmas[i - 1])) / h
                den_d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
                x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * den_d
        old = den
    return x


def k_dpmpp_2m_sde(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    old, h_last, h = None, None, None
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = den
        else:
            t, s = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x + (-math.expm1(-h - eta_h)) * den
            if old is not None:
                r = h_last / h
                x = x + 0.5 * (-math.expm1(-h - eta_h)) * (1 / r) * (den - old)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        old, h_last = den, h
    return x


def k_dpmpp_3m_sde(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    den_1, den_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = den
        else:
            t, s = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = s - t
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * den
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (den - den_1) / r0
                d1_1 = (den_1 - den_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * (den - den_1) / r
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        den_1, den_2 = den, den_1
        h_1, h_2 = h, h_1
    return x


K_DIFFUSION = {
    "euler": k_euler,
    "euler_ancestral": k_euler_ancestral,
    "heun": k_heun,
    "dpm_2": k_dpm_2,
    "dpm_2_ancestral": k_dpm_2_ancestral,
    "lms": k_lms,
    "dpmpp_2s_ancestral": k_dpmpp_2s_ancestral,
    "dpmpp_sde": k_dpmpp_sde,
    "dpmpp_2m": k_dpmpp_2m,
    "dpmpp_2m_sde": k_dpmpp_2m_sde,
    "dpmpp_3m_sde": k_dpmpp_3m_sde,
}
STOCHASTIC = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
              "dpmpp_3m_sde", "ddpm", "lcm"}

# ---------------------------------------------------------------------------------------------
# diffusers schedulers driven on an arbitrary sigma schedule
#
# Fake training timesteps j = 0..n stand for sigmas[n - j]; alphas_cumprod[j] = 1 / (1 + sigma^2)
# (1 for a final sigma of 0). The scheduler steps j = n, ..., 1 in VP space (x_vp = x / sqrt(1 +
# sigma^2)) and gets eps = (x - D(x, sigma)) / sigma from the analytic denoiser.

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 set_alpha_to_one=False, steps_offset=1, clip_sample=False)


def _vp_scale(sigma):
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def _fake_alphas(sigmas):
    n = len(sigmas) - 1
    return torch.tensor([1.0 / (1.0 + float(sigmas[n - j]) ** 2) for j in range(n + 1)], dtype=torch.float64)


class _PatchedNoise:
    """Makes a diffusers scheduler module's randn_tensor return KeyedNoise for the current step."""

    def __init__(self, module, noise):
        self.module, self.noise, self.key = module, noise, None

    def __enter__(self):
        self.orig = self.module.randn_tensor
        self.module.randn_tensor = lambda *a, **k: self.noise(*self.key)
        return self

    def __exit__(self, *exc):
        self.module.randn_tensor = self.orig


def diffusers_ddim(model, x, sigmas, **kw):
    from diffusers import DDIMScheduler

    s = [float(v) for v in sigmas]
    n = len(s) - 1
    sched = DDIMScheduler(num_train_timesteps=n + 1, set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(n)
    sched.alphas_cumprod = _fake_alphas(s)
    sched.timesteps = torch.arange(n, 0, -1)
    xv = x * _vp_scale(s[0])
    for k, t in enumerate(sched.timesteps):
        x_ve = xv / _vp_scale(s[k])
        eps = (x_ve - model(x_ve, s[k])) / s[k]
        xv = sched.step(eps, t, xv, eta=0.0).prev_sample
    return xv / _vp_scale(s[-1])


def diffusers_ddpm(model, x, sigmas, noise, **kw):
    import diffusers.schedulers.scheduling_ddpm as mod

    s = [float(v) for v in sigmas]
    n = len(s) - 1
    sched = mod.DDPMScheduler(num_train_timesteps=n + 1, clip_sample=False, variance_type="fixed_small")
    sched.set_timesteps(n)
    sched.alphas_cumprod = _fake_alphas(s)
    sched.one = sched.alphas_cumprod[0]  # its last step goes to "alphas_cumprod[-1]": our last sigma
    sched.timesteps = torch.arange(n, 0, -1)
    xv = x * _vp_scale(s[0])
    with _PatchedNoise(mod, noise) as p:
        for k, t in enumerate(sched.timesteps):
            x_ve = xv / _vp_scale(s[k])
            eps = (x_ve - model(x_ve, s[k])) / s[k]
            p.key = (s[k], s[k + 1])
            xv = sched.step(eps, t, xv).prev_sample
    return xv / _vp_scale(s[-1])


def diffusers_lcm(model, x, sigmas, noise, **kw):
    import diffusers.schedulers.scheduling_lcm as mod

    s = [float(v) for v in sigmas]
    n = len(s) - 1
    sched = mod.LCMScheduler(num_train_timesteps=1000, set_alpha_to_one=True)
    sched.set_timesteps(min(n, 50))
    sched.alphas_cumprod = _fake_alphas(s)
    sched.timesteps = torch.arange(n, 0, -1)
    sched.num_inference_steps = n
    # the consistency boundary condition is the LCM denoiser's business, not the sampler's
    sched.get_scalings_for_boundary_condition_discrete = lambda t: (0.0, 1.0)
    xv = x * _vp_scale(s[0])
    with _PatchedNoise(mod, noise) as p:
        for k, t in enumerate(sched.timesteps):
            x_ve = xv / _vp_scale(s[k])
            eps = (x_ve - model(x_ve, s[k])) / s[k]
            p.key = (s[k], s[k + 1])
            xv = sched.step(eps, t, xv).prev_sample
    return xv / _vp_scale(s[-1])


def diffusers_unipc(model, x, sigmas, order=2, solver_type="bh2", **kw):
    from diffusers import UniPCMultistepScheduler

    s = [float(v) for v in sigmas]
    n = len(s) - 1
    sched = UniPCMultistepScheduler(solver_order=order, solver_type=solver_type, lower_order_final=True)
    sched.set_timesteps(n)
    sched.sigmas = torch.tensor(s, dtype=torch.float64)
    sched.timesteps = torch.arange(n, 0, -1)
    xv = x * _vp_scale(s[0])
    for k, t in enumerate(sched.timesteps):
        x_ve = xv / _vp_scale(s[k])
        eps = (x_ve - model(x_ve, s[k])) / s[k]
        xv = sched.step(eps, t, xv).prev_sample
    return xv / _vp_scale(s[-1])


DIFFUSERS = {"ddim": diffusers_ddim, "ddpm": diffusers_ddpm, "uni_pc": diffusers_unipc, "lcm": diffusers_lcm}


def reference(sampler, model, x, sigmas, noise=None, eta=1.0, s_noise=1.0):
    if sampler in K_DIFFUSION:
        fn = K_DIFFUSION[sampler]
        if sampler in STOCHASTIC:
            return fn(model, x, [float(v) for v in sigmas], noise=noise, eta=eta, s_noise=s_noise)
        return fn(model, x, [float(v) for v in sigmas])
    return DIFFUSERS[sampler](model, x, sigmas, noise=noise)
