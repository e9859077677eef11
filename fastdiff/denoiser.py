"""The model as a k-diffusion denoiser, `D(x, sigma) -> x0`, evaluated for many images at once.

An epsilon- or v-predicting UNet trained on discrete DDPM timesteps becomes a denoiser as in
k-diffusion's CompVisDenoiser / CompVisVDenoiser (sigma_data = 1):

    x0 = c_skip(sigma) * x + c_out(sigma) * UNet(c_in(sigma) * x, t(sigma), context)

Classifier-free guidance is decided here and nowhere else: an image with guidance g != 1 gives
two UNet rows (its negative context, then its prompt's), folded back into one x0 by a single
`lincomb` over (x, uncond, cond); with g == 1 it gives one row and no uncond is computed.

`BatchDenoiser` evaluates the pending (x, sigma) of a group of images — each with its own sigma,
guidance scale, contexts and extra channels — in one UNet call. Eager and CUDA-graph execution
share it: the rows are assembled the same way, then either the UNet runs on them or they are
copied into a captured graph's static buffers and the graph replays (fastdiff/graphs.py).
Everything that depends on sigma alone is computed on the host in float64 from Python floats.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from fastdiff import ops
from fastdiff._core import ModelSchedule

__all__ = ["ModelSchedule", "Conditioning", "BatchDenoiser", "output_coefficients", "KVHook",
           "hypernetworks_applied"]


def output_coefficients(prediction_type: str, sigma: float, g: float, cfg: bool) -> list[float]:
    """x0 = c_skip * x + c_out * (uncond + g (cond - uncond)) as lincomb coefficients over
    (x, uncond, cond), or over (x, cond) without guidance."""
    if prediction_type == "epsilon":
        c_skip, c_out = 1.0, -sigma
    elif prediction_type == "v_prediction":
        c_skip = 1.0 / (sigma * sigma + 1.0)
        c_out = -sigma / math.sqrt(sigma * sigma + 1.0)
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if not cfg:
        return [c_skip, c_out]
    return [c_skip, c_out * (1.0 - g), c_out * g]


@dataclass(eq=False)
class Conditioning:
    """What one image's model evaluations are conditioned on, fixed when its call starts.

    cond / uncond: [1, L, dim] contexts in the model dtype (uncond None when guidance is 1);
    extra: [1, E, h, w] channels concatenated after x (inpainting UNets) or None;
    hypernetworks: ((module, strength), ...) applied to every attention's context."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    guidance: float
    extra: torch.Tensor | None = None
    hypernetworks: tuple = ()
    key: tuple = field(init=False)

    def __post_init__(self):
        if (self.uncond is not None) != self.uses_uncond(self.guidance):
            raise ValueError("an uncond context is needed exactly when guidance != 1")
        if self.uncond is not None and self.uncond.shape != self.cond.shape:
            raise ValueError(f"cond {list(self.cond.shape)} and uncond {list(self.uncond.shape)} contexts differ in shape")
        # Images share a UNet call only when their rows stack (context length, extra channels)
        # and the same hypernetworks at the same strengths apply to every row.
        self.key = (tuple(self.cond.shape[1:]), 0 if self.extra is None else self.extra.shape[1],
                    tuple((id(h), float(s)) for h, s in self.hypernetworks))

    @staticmethod
    def uses_uncond(guidance: float) -> bool:
        """Guidance 1 is the conditional prediction alone: no uncond row is computed."""
        return guidance != 1.0

    @property
    def cfg(self) -> bool:
        return self.uncond is not None

    @property
    def rows(self) -> int:
        return 2 if self.cfg else 1

    def contexts(self) -> list[torch.Tensor]:
        return [self.uncond, self.cond] if self.cfg else [self.cond]


class KVHook:
    """A stack of hypernetworks as an attention `kv_hook`: ctx -> (ctx_k, ctx_v), each applied at
    its own strength (a float, or a 0-dim device tensor read inside a CUDA graph). The strengths
    belong to the hook, not to the modules, so a call's strengths cannot change under it."""

    def __init__(self, pairs):
        self.pairs = list(pairs)

    def __call__(self, ctx: torch.Tensor):
        k = v = ctx
        for hn, s in self.pairs:
            k, v = hn.apply_kv(k, v, s)  # the identity at a float strength of 0
        return k, v


@contextlib.contextmanager
def hypernetworks_applied(unet, pairs):
    """The UNet's attentions run `pairs` ((module, strength), ...) as their kv_hook inside the
    block, and nothing after it (eager calls and graph captures both go through here)."""
    hook = KVHook(pairs) if pairs else None
    for m in unet.attention_modules():
        m.kv_hook = hook
    try:
        yield
    finally:
        for m in unet.attention_modules():
            m.kv_hook = None


class BatchDenoiser:
    """Evaluates D(x_i, sigma_i) for a group of images whose Conditioning keys are equal.

    `min_rows`: the CPU's oneDNN convolutions round a 1-row batch differently from a larger
    one, so a lone row is evaluated twice over; from 2 rows up each row's result is independent
    of the others (what makes an image the same alone or in any batch). `graphs`: a GraphCache
    (CUDA) or None (eager)."""

    def __init__(self, unet, schedule: ModelSchedule, prediction_type: str, *, dtype, device,
                 graphs=None, channels_last: bool = False, min_rows: int = 1):
        output_coefficients(prediction_type, 1.0, 1.0, False)  # validates the name
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.dtype = dtype
        self.device = torch.device(device)
        self.graphs = graphs
        self.channels_last = channels_last
        self.min_rows = min_rows

    def _host_floats(self, values) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float32)
        if self.device.type == "cuda":  # pinned + non_blocking: no host synchronisation
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def rows(self, items):
        """(x_in [R, Cin, h, w] model dtype, t [R] fp32, context [R, L, dim]) for items
        [(Conditioning, x [1, C, h, w] fp32, sigma)], each image's rows adjacent, uncond first."""
        xs, ts, ctxs = [], [], []
        for cond, x, sigma in items:
            x_in = (x * (1.0 / math.sqrt(sigma * sigma + 1.0))).to(self.dtype)  # [1, C, h, w]
            if cond.extra is not None:
                x_in = torch.cat([x_in, cond.extra], dim=1)
            t = self.schedule.sigma_to_t(sigma)
            for ctx in cond.contexts():
                xs.append(x_in)
                ts.append(t)
                ctxs.append(ctx)
        while len(xs) < self.min_rows:  # a lone row is evaluated twice (see the class docstring)
            xs.append(xs[-1])
            ts.append(ts[-1])
            ctxs.append(ctxs[-1])
        return torch.cat(xs), self._host_floats(ts), torch.cat(ctxs)

    def __call__(self, items) -> list[torch.Tensor]:
        """items: [(Conditioning, x [1, C, h, w] fp32, sigma: float)] -> [x0 [1, C, h, w] fp32]."""
        x_in, t, ctx = self.rows(items)
        pairs = items[0][0].hypernetworks
        if self.graphs is not None:
            out = self.graphs.run(self.unet, x_in, t, ctx, pairs)
        else:
            with hypernetworks_applied(self.unet, pairs):
                if self.channels_last:
                    x_in = x_in.contiguous(memory_format=torch.channels_last)
                out = self.unet(x_in, t, ctx)
        results, r = [], 0
        for cond, x, sigma in items:
            c = output_coefficients(self.prediction_type, sigma, cond.guidance, cond.cfg)
            o = out[r:r + cond.rows].float()  # [rows, C, h, w]
            results.append(ops.lincomb(c, [x, *o.split(1)]))
            r += cond.rows
        return results
