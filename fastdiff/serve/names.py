"""A1111's names for samplers and schedulers, and the older names its clients still send.

A1111 (1.9+) shows a sampler ("DPM++ 2M") and a scheduler ("Karras") separately; before that
a sampler name carried its schedule ("DPM++ 2M Karras"), and older clients still send those,
or the k-diffusion ids ("k_dpmpp_2m"). All of them, and fastdiff's own names, map to a
(sampler, schedule) pair of fastdiff.sampling.
"""
from __future__ import annotations

from fastdiff import sampling
from fastdiff.results import A1111_SAMPLER_NAMES, A1111_SCHEDULE_NAMES

# A1111's aliases (modules/sd_samplers_kdiffusion.py samplers_k_diffusion)
_ALIASES = {
    "k_euler": "euler", "k_euler_a": "euler_ancestral", "k_heun": "heun", "k_dpm_2": "dpm_2",
    "k_dpm_2_a": "dpm_2_ancestral", "k_lms": "lms", "k_dpmpp_2s_a": "dpmpp_2s_ancestral",
    "k_dpmpp_sde": "dpmpp_sde", "k_dpmpp_2m": "dpmpp_2m", "k_dpmpp_2m_sde": "dpmpp_2m_sde",
    "k_dpmpp_3m_sde": "dpmpp_3m_sde", "unipc": "uni_pc", "plms": None,
}
_SAMPLERS = {**{v.lower(): k for k, v in A1111_SAMPLER_NAMES.items()}, **{s: s for s in sampling.SAMPLERS},
             **{k: v for k, v in _ALIASES.items() if v}}
_SCHEDULES = {**{v.lower(): k for k, v in A1111_SCHEDULE_NAMES.items()}, **{s: s for s in sampling.SCHEDULES},
              "uniform": "normal", "automatic": "normal"}
# suffixes of the old combined names ("DPM++ 2M Karras", "DPM++ 2M SDE Exponential")
_SUFFIXES = {"karras": "karras", "exponential": "exponential", "sgm uniform": "sgm_uniform",
             "simple": "simple", "beta": "beta"}


def sampler_names() -> list[str]:
    """The samplers as A1111 lists them (GET /sdapi/v1/samplers)."""
    return [A1111_SAMPLER_NAMES.get(s, s) for s in sampling.SAMPLERS]


def schedule_names() -> list[str]:
    return [A1111_SCHEDULE_NAMES.get(s, s) for s in sampling.SCHEDULES]


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """An A1111 or fastdiff sampler name -> (sampler, schedule the name implies or None).
    Raises ValueError naming the valid names."""
    key = name.strip().lower()
    if key in _SAMPLERS:
        return _SAMPLERS[key], None
    for suffix, schedule in _SUFFIXES.items():
        if key.endswith(" " + suffix) and key[: -len(suffix) - 1] in _SAMPLERS:
            return _SAMPLERS[key[: -len(suffix) - 1]], schedule
    raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sampler_names())} "
                     f"(or {', '.join(sampling.SAMPLERS)})")


def resolve_schedule(name: str) -> str:
    key = name.strip().lower()
    if key in _SCHEDULES:
        return _SCHEDULES[key]
    raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(schedule_names())} "
                     f"(or {', '.join(sampling.SCHEDULES)})")
