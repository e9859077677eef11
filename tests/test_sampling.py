"""fastdiff.sampling: every sampler x every schedule against independent float64 references
(tests/sampling_reference.py), schedule definitions, cross-checks against diffusers, the loop's
contract (one update per model evaluation, no tensor reads) and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff import _core, sampling

import sampling_reference as R  # tests/ is on sys.path (rootdir-relative test modules)

SHAPE = (2, 4, 4, 4)
STEPS = 8
TOL = 1e-6


def _x(sigma0, seed=3, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * float(sigma0)


class CountingUpdate:
    def __init__(self):
        self.calls, self.sizes = 0, []

    def __call__(self, coeffs, tensors):
        self.calls += 1
        self.sizes.append(len(tensors))
        assert len(coeffs) == len(tensors) and all(type(c) is float for c in coeffs)
        return sum(c * t for c, t in zip(coeffs, tensors))


def _check(out, ref, tol=TOL):
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    err = R.rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3e} > {tol:g}"


# ---------------------------------------------------------------------------------------------
# the grid: 15 samplers x 7 schedules


@pytest.mark.parametrize("schedule", sampling.SCHEDULES)
@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_sampler_schedule_parity(sampler, schedule):
    sig = sampling.sigmas(schedule, STEPS)
    x = _x(sig[0])
    den, noise, upd = R.GaussianDenoiser(SHAPE), R.KeyedNoise(SHAPE), CountingUpdate()
    out = sampling.sample(den, x, sig, sampler, noise_sampler=noise, update=upd)
    den_ref, noise_ref = R.GaussianDenoiser(SHAPE), R.KeyedNoise(SHAPE)
    ref = R.reference(sampler, den_ref, x, sig, noise=noise_ref)
    _check(out, ref)
    # same model evaluations, one update per evaluation, same noise draws
    assert len(den.calls) == len(den_ref.calls)
    np.testing.assert_allclose(den.calls, den_ref.calls, rtol=1e-12)
    assert upd.calls == len(den.calls)
    assert max(upd.sizes) <= (8 if sampler == "lms" else 5)
    if sampler in R.STOCHASTIC:
        assert noise.calls and set(noise.calls) <= set(noise_ref.cache)
    else:
        assert not noise.calls


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_partial_schedule_ending_above_zero(sampler):
    """img2img-style: sigmas need not end in 0 (LCM's diffusers step always ends on D: skipped)."""
    if sampler == "lcm":
        pytest.skip("diffusers' LCMScheduler returns the denoised sample on its last step whatever the sigma")
    sig = sampling.sigmas("karras", 9)[2:-1]  # 7 steps from mid-range down to sigma_min > 0
    x = _x(sig[0], seed=5)
    out = sampling.sample(R.GaussianDenoiser(SHAPE), x, sig, sampler, noise_sampler=R.KeyedNoise(SHAPE))
    ref = R.reference(sampler, R.GaussianDenoiser(SHAPE), x, sig, noise=R.KeyedNoise(SHAPE))
    _check(out, ref)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                     "dpmpp_2m_sde", "dpmpp_3m_sde"])
@pytest.mark.parametrize("eta,s_noise", [(0.0, 1.0), (0.5, 1.3), (1.5, 0.9)])
def test_eta_and_s_noise(sampler, eta, s_noise):
    sig = sampling.sigmas("exponential", 7)
    x = _x(sig[0], seed=11)
    noise = R.KeyedNoise(SHAPE)
    out = sampling.sample(R.GaussianDenoiser(SHAPE), x, sig, sampler, noise_sampler=noise, eta=eta, s_noise=s_noise)
    ref = R.reference(sampler, R.GaussianDenoiser(SHAPE), x, sig, noise=R.KeyedNoise(SHAPE), eta=eta, s_noise=s_noise)
    _check(out, ref)
    if eta == 0.0:
        assert not noise.calls


def test_deterministic_equivalences():
    """eta = 0 ancestral == its ODE sampler; ddim == euler; ddpm == euler_ancestral(eta=1)."""
    sig = sampling.sigmas("normal", 6)
    x = _x(sig[0])
    D = R.GaussianDenoiser(SHAPE)
    run = lambda name, **kw: sampling.sample(D, x, sig, name, noise_sampler=R.KeyedNoise(SHAPE), **kw)
    _check(run("euler_ancestral", eta=0.0), run("euler"), 1e-14)
    _check(run("ddim", eta=0.7), run("euler"), 1e-14)
    _check(run("ddpm"), run("euler_ancestral", eta=1.0), 1e-12)
    _check(run("dpmpp_2m_sde", eta=0.0), run("dpmpp_2m_sde", eta=0.0, s_noise=5.0), 1e-15)


# ---------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("schedule", sampling.SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 7, 10, 33])
def test_schedule_reference(schedule, steps):
    sig = sampling.sigmas(schedule, steps)
    assert sig.dtype == torch.float64 and sig.ndim == 1
    assert len(sig) == steps + 1 and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    _check(sig, R.ref_sigmas(schedule, steps), 1e-12)


@pytest.mark.parametrize("schedule", ["normal", "karras", "exponential", "sgm_uniform"])
def test_schedule_custom_range_and_alphas(schedule):
    betas = np.linspace(1e-4, 0.02, 1000)
    ac = np.cumprod(1 - betas)  # a different (linear) training schedule
    kw = dict(sigma_min=0.1, sigma_max=10.0)
    sig = sampling.sigmas(schedule, 9, torch.tensor(ac), rho=5.0, **kw)
    _check(sig, R.ref_sigmas(schedule, 9, ac, rho=5.0, **kw), 1e-12)
    assert abs(float(sig[0]) - 10.0) < 1e-9
    if schedule != "sgm_uniform":  # sgm_uniform drops the sigma_min end point
        assert abs(float(sig[-2]) - 0.1) < 1e-9


def test_beta_schedule_merges_repeated_timesteps():
    sig = sampling.sigmas("beta", 400)
    ref = R.ref_sigmas("beta", 400)
    assert len(sig) == len(ref) < 401
    _check(sig, ref, 1e-12)


def test_beta_ppf_and_lms_coeff_against_scipy_and_exact():
    from scipy import stats

    for q in [1e-6, 0.01, 0.2, 0.5, 0.77, 0.999, 1 - 1e-9]:
        for a, b in [(0.6, 0.6), (2.0, 5.0), (0.5, 3.0)]:
            assert abs(_core.beta_ppf(q, a, b) - stats.beta.ppf(q, a, b)) < 1e-12
    t = sampling.sigmas("karras", 10).tolist()
    for order in range(1, 5):
        for i in range(order - 1, 10):
            for j in range(order):
                exact = R.lms_coeff_exact(order, t, i, j)
                assert abs(_core.lms_coeff(order, t, i, j) - exact) <= 1e-12 * max(1.0, abs(exact))


def test_default_alphas_cumprod():
    _check(sampling.default_alphas_cumprod(), torch.tensor(R.sd_alphas_cumprod()), 1e-14)


# diffusers' own timestep spacings, where they coincide with ours (float32 alphas in diffusers:
# we pass its alphas_cumprod so the remaining difference is its float32 sigmas)


def _diffusers_sigmas(cls, steps, **cfg):
    sched = cls.from_config({**R.SD_CONFIG, **cfg})
    sched.set_timesteps(steps)
    return sched, sched.sigmas.double()


@pytest.mark.parametrize("schedule,cfg,steps", [
    ("karras", dict(use_karras_sigmas=True), 9),
    ("exponential", dict(use_exponential_sigmas=True), 9),
    ("normal", dict(timestep_spacing="linspace"), 10),   # integer timesteps when 999 % (steps-1) == 0
    ("simple", dict(timestep_spacing="trailing"), 10),   # trailing == simple when 1000 % steps == 0
    ("simple", dict(timestep_spacing="trailing"), 8),
])
def test_schedule_matches_diffusers(schedule, cfg, steps):
    from diffusers import EulerDiscreteScheduler

    sched, ref = _diffusers_sigmas(EulerDiscreteScheduler, steps, **cfg)
    ours = sampling.sigmas(schedule, steps, sched.alphas_cumprod.double())
    _check(ours, ref, 1e-6)


@pytest.mark.parametrize("steps", [6, 10, 25])
def test_ddim_uniform_matches_diffusers_leading(steps):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(R.SD_CONFIG)  # leading spacing, steps_offset 1
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.double()
    ref = ((1 - ac[sched.timesteps]) / ac[sched.timesteps]).sqrt()
    _check(sampling.sigmas("ddim_uniform", steps, ac)[:-1], ref, 1e-12)


# ---------------------------------------------------------------------------------------------
# samplers against diffusers' schedulers on diffusers' own (SD config) schedules


def _vp(sigma):
    return 1.0 / math.sqrt(1.0 + float(sigma) ** 2)


def _ve_loop(sched, den, x, sigma_now):
    """Drive a k-diffusion style (VE) diffusers scheduler; sigma_now(sched) = sigma being evaluated."""
    for t in sched.timesteps:
        sched.scale_model_input(x, t)  # initialises the step index
        s = float(sigma_now(sched))
        eps = (x - den(x, s)) / s
        x = sched.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m"])
def test_k_samplers_match_diffusers(sampler, monkeypatch):
    import diffusers
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea

    steps = 9
    cls = {"euler": diffusers.EulerDiscreteScheduler, "euler_ancestral": ea.EulerAncestralDiscreteScheduler,
           "heun": diffusers.HeunDiscreteScheduler, "dpm_2": diffusers.KDPM2DiscreteScheduler,
           "lms": diffusers.LMSDiscreteScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}[sampler]
    cfg = dict(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=False) if sampler == "dpmpp_2m" else {}
    sched = cls.from_config({**R.SD_CONFIG, **cfg})
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()  # run diffusers' maths in float64
    if hasattr(sched, "sigmas_interpol"):
        sched.sigmas_interpol = sched.sigmas_interpol.double()
    sig = torch.unique_consecutive(sched.sigmas)
    assert len(sig) == steps + 1
    x = _x(sig[0])
    noise = R.KeyedNoise(SHAPE)
    ours = sampling.sample(R.GaussianDenoiser(SHAPE), x, sig, sampler, noise_sampler=noise)

    den = R.GaussianDenoiser(SHAPE)
    if sampler == "dpmpp_2m":  # VP sample, no input scaling
        xv = x * _vp(sig[0])
        for k, t in enumerate(sched.timesteps):
            x_ve = xv / _vp(sig[k])
            eps = (x_ve - den(x_ve, float(sig[k]))) / float(sig[k])
            xv = sched.step(eps, t, xv).prev_sample
        ref = xv
    elif sampler == "dpm_2":
        ref = _ve_loop(sched, den, x, lambda s: s.sigmas[s.step_index] if s.state_in_first_order
                       else s.sigmas_interpol[s.step_index])
    else:
        if sampler == "euler_ancestral":
            def keyed(*a, **k):
                i = sched.step_index
                return noise(float(sched.sigmas[i]), float(sched.sigmas[i + 1]))
            monkeypatch.setattr(ea, "randn_tensor", keyed)
        ref = _ve_loop(sched, den, x, lambda s: s.sigmas[s.step_index])
    _check(ours, ref)


def test_ddim_matches_diffusers_sd_config():
    """set_alpha_to_one=False: diffusers' DDIM ends at alphas_cumprod[0], i.e. sigma(t=0) > 0."""
    from diffusers import DDIMScheduler

    steps = 10
    sched = DDIMScheduler.from_config(R.SD_CONFIG)
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.double()
    sig = torch.cat([sampling.sigmas("ddim_uniform", steps, ac)[:-1], ((1 - ac[:1]) / ac[:1]).sqrt()])
    x = _x(sig[0])
    ours = sampling.sample(R.GaussianDenoiser(SHAPE), x, sig, "ddim")
    den, xv = R.GaussianDenoiser(SHAPE), x * _vp(sig[0])
    for k, t in enumerate(sched.timesteps):
        x_ve = xv / _vp(sig[k])
        xv = sched.step((x_ve - den(x_ve, float(sig[k]))) / float(sig[k]), t, xv, eta=0.0).prev_sample
    _check(ours * _vp(sig[-1]), xv)


def test_ddpm_matches_diffusers_sd_config(monkeypatch):
    import diffusers.schedulers.scheduling_ddpm as mod

    steps = 10
    sched = mod.DDPMScheduler.from_config(R.SD_CONFIG)
    sched.set_timesteps(steps)
    sig = sampling.sigmas("ddim_uniform", steps, sched.alphas_cumprod.double())
    x, noise = _x(sig[0]), R.KeyedNoise(SHAPE)
    ours = sampling.sample(R.GaussianDenoiser(SHAPE), x, sig, "ddpm", noise_sampler=noise)
    key = {}
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: noise(*key["k"]))
    den, xv = R.GaussianDenoiser(SHAPE), x * _vp(sig[0])
    for k, t in enumerate(sched.timesteps):
        x_ve = xv / _vp(sig[k])
        key["k"] = (float(sig[k]), float(sig[k + 1]))
        xv = sched.step((x_ve - den(x_ve, float(sig[k]))) / float(sig[k]), t, xv).prev_sample
    _check(ours, xv)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_uni_pc_matches_diffusers_sd_config(spacing):
    from diffusers import UniPCMultistepScheduler

    steps = 10
    sched = UniPCMultistepScheduler.from_config({**R.SD_CONFIG, "timestep_spacing": spacing})
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    sig = sched.sigmas
    x = _x(sig[0])
    ours = sampling.sample(R.GaussianDenoiser(SHAPE), x, sig, "uni_pc")
    den, xv = R.GaussianDenoiser(SHAPE), x * _vp(sig[0])
    for k, t in enumerate(sched.timesteps):
        x_ve = xv / _vp(sig[k])
        xv = sched.step((x_ve - den(x_ve, float(sig[k]))) / float(sig[k]), t, xv).prev_sample
    _check(ours, xv)


def test_lcm_matches_diffusers_sd_config(monkeypatch):
    import diffusers.schedulers.scheduling_lcm as mod

    sched = mod.LCMScheduler.from_config(R.SD_CONFIG)
    sched.set_timesteps(4)
    monkeypatch.setattr(sched, "get_scalings_for_boundary_condition_discrete", lambda t: (0.0, 1.0))
    ac = sched.alphas_cumprod.double()
    sig = torch.cat([((1 - ac[sched.timesteps]) / ac[sched.timesteps]).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x, noise = _x(sig[0]), R.KeyedNoise(SHAPE)
    ours = sampling.sample(R.GaussianDenoiser(SHAPE), x, sig, "lcm", noise_sampler=noise)
    key = {}
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: noise(*key["k"]))
    den, xv = R.GaussianDenoiser(SHAPE), x * _vp(sig[0])
    for k, t in enumerate(sched.timesteps):
        x_ve = xv / _vp(sig[k])
        key["k"] = (float(sig[k]), float(sig[k + 1]))
        xv = sched.step((x_ve - den(x_ve, float(sig[k]))) / float(sig[k]), t, xv).prev_sample
    _check(ours, xv)


# ---------------------------------------------------------------------------------------------
# the loop's contract


def test_callback_and_default_noise_with_generator():
    sig = sampling.sigmas("karras", 5)
    x = _x(sig[0]).float()
    seen = []
    run = lambda cb=None: sampling.sample(R.GaussianDenoiser(SHAPE), x, sig, "euler_ancestral",
                                          generator=torch.Generator().manual_seed(0), callback=cb)
    a = run(lambda d: seen.append(d))
    b = run()
    assert a.dtype == torch.float32 and torch.equal(a, b)  # same generator seed, same result
    assert [d["i"] for d in seen] == list(range(5))
    assert [d["sigma"] for d in seen] == sig[:-1].tolist() and all(type(d["sigma"]) is float for d in seen)
    assert set(seen[0]) == {"i", "x", "sigma", "denoised"} and seen[0]["x"] is x
    c = sampling.sample(R.GaussianDenoiser(SHAPE), x, sig, "euler_ancestral", generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)


def test_default_update_is_ops_lincomb(monkeypatch):
    from fastdiff import ops

    calls = []
    orig = ops.lincomb
    monkeypatch.setattr(ops, "lincomb", lambda c, t: calls.append(len(t)) or orig(c, t))
    sig = sampling.sigmas("normal", 4)
    sampling.sample(R.GaussianDenoiser(SHAPE), _x(sig[0]), sig, "heun")
    assert len(calls) == 7


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_loop_reads_no_tensor_values(sampler):
    """Outside the callbacks the C++ loop may only look at x.shape: no .item(), no arithmetic."""
    from torch.overrides import TorchFunctionMode

    class Spy(TorchFunctionMode):
        inside, outside = 0, []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if not Spy.inside:
                Spy.outside.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    def wrap(f):
        def g(*a):
            Spy.inside += 1
            try:
                return f(*a)
            finally:
                Spy.inside -= 1
        return g

    sig = sampling.sigmas("karras", 5).tolist()
    x = _x(sig[0])
    upd = wrap(lambda c, t: sum(ci * ti for ci, ti in zip(c, t)))
    den, noise, cb = wrap(R.GaussianDenoiser(SHAPE)), wrap(R.KeyedNoise(SHAPE)), wrap(lambda d: None)
    with Spy():
        _core.sample(sampler, den, x, sig, noise, upd, cb, 1.0, 1.0)
    assert set(Spy.outside) <= {"__get__"}, Spy.outside  # Tensor.shape


# ---------------------------------------------------------------------------------------------
# bad input


def test_unknown_names_list_the_valid_ones():
    sig = sampling.sigmas("karras", 3)
    with pytest.raises(ValueError, match="valid samplers: euler, euler_ancestral.*uni_pc, lcm"):
        sampling.sample(R.GaussianDenoiser(SHAPE), _x(sig[0]), sig, "euler_a")
    with pytest.raises(ValueError, match="valid schedules: normal, karras.*ddim_uniform, beta"):
        sampling.sigmas("linear", 10)


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one(steps):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sampling.sigmas("karras", steps)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="sigma_min"):
        sampling.sigmas("karras", 5, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="no sigma_min/sigma_max"):
        sampling.sigmas("simple", 5, sigma_max=3.0)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        sampling.sigmas("normal", 5, torch.tensor([0.9, 0.95, 0.5]))
    with pytest.raises(ValueError, match="steps must be an int"):
        sampling.sigmas("normal", 5.0)


@pytest.mark.parametrize("bad,match", [
    ([14.0, 3.0, 5.0, 0.0], "strictly decreasing"),
    ([14.0, 3.0, 3.0, 0.0], "strictly decreasing"),
    ([14.0, 3.0, -1.0], "finite and >= 0"),
    ([14.0, float("nan"), 0.0], "finite and >= 0"),
    ([14.0], "at least 2"),
])
def test_bad_sigmas(bad, match):
    with pytest.raises(ValueError, match=match):
        sampling.sample(R.GaussianDenoiser(SHAPE), _x(14.0), torch.tensor(bad, dtype=torch.float64), "euler")


def test_mismatched_shapes():
    sig = sampling.sigmas("karras", 3)
    x = _x(sig[0])
    with pytest.raises(ValueError, match=r"denoise returned shape .*expected the shape of x"):
        sampling.sample(lambda x, s: x[:1], x, sig, "euler")
    with pytest.raises(ValueError, match=r"noise_sampler returned shape"):
        sampling.sample(R.GaussianDenoiser(SHAPE), x, sig, "euler_ancestral",
                        noise_sampler=lambda a, b: torch.zeros(3))
    with pytest.raises(ValueError, match="denoise must return a tensor"):
        sampling.sample(lambda x, s: 1.0, x, sig, "euler")
    with pytest.raises(ValueError, match="sigmas must be 1-D"):
        sampling.sample(R.GaussianDenoiser(SHAPE), x, sig[None], "euler")


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "uni_pc"])
def test_nan_result_is_reported_once_at_the_end(sampler):
    sig = sampling.sigmas("karras", 6)
    calls = []

    def nan_once(x, s):
        calls.append(s)
        out = R.GaussianDenoiser(SHAPE)(x, s)
        return out * float("nan") if len(calls) == 3 else out

    with pytest.raises(FloatingPointError, match=rf"sampler '{sampler}' produced NaN or inf after 6 steps"):
        sampling.sample(nan_once, _x(sig[0]), sig, sampler)
    assert len(calls) == 6  # the loop ran to the end: no per-step check
