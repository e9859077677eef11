"""CUDA graphs for the denoiser: one captured model evaluation per (batch, latent size, guidance,
context length, hypernetwork set), replayed by the C++ sampling loop.

What a graph holds is exactly `Denoiser.__call__`: scale the input, run the UNet on the
cond+uncond batch, fold guidance and the k-diffusion output scaling into one `lincomb`.
Everything that changes between evaluations lives in static device buffers that are refilled
before each replay with asynchronous copies and fills — never a host synchronisation:

- x (copied in), c_in and the timestep (filled from host floats), the three output
  coefficients (a device tensor that the lincomb kernel reads at run time);
- the text context (copied in once per call: a new prompt needs no re-capture);
- each hypernetwork's strength (a device scalar the hypernetwork reads inside the graph).

The sampler update itself (`ops.lincomb` over the sampler's history) runs outside the graph as
one fused kernel per step; the UNet is all but a few microseconds of a step.

`capture=False` runs the same body eagerly on the same static buffers: CPU tests use it to
check the buffer logic against `Denoiser` without a GPU.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from fastdiff import ops


def output_coefficients(prediction_type: str, sigma: float, g: float, cfg: bool) -> list[float]:
    """x0 = c_skip * x + c_out * (uncond + g (cond - uncond)) as lincomb coefficients over
    (x, uncond, cond), or (x, cond) without guidance."""
    if prediction_type == "epsilon":
        c_skip, c_out = 1.0, -sigma
    else:
        c_skip = 1.0 / (sigma * sigma + 1.0)
        c_out = -sigma / math.sqrt(sigma * sigma + 1.0)
    if not cfg:
        return [c_skip, c_out, 0.0]
    return [c_skip, c_out * (1.0 - g), c_out * g]


class StepGraph:
    """One captured denoiser evaluation. Call `bind(...)` once per sampling call, then use the
    object as `denoise(x, sigma) -> x0`."""

    def __init__(self, unet, schedule, prediction_type: str, *, batch: int, latent_shape, cfg: bool,
                 context_shape, dtype, extra_channels: int = 0, hypernetworks=(), device,
                 pool=None, capture: bool = True, channels_last: bool = False):
        self.unet, self.schedule, self.prediction_type = unet, schedule, prediction_type
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.hypernetworks = list(hypernetworks)
        self.channels_last = channels_last
        B, (C, h, w) = batch, latent_shape
        Bx = 2 * B if cfg else B
        f32 = dict(device=self.device, dtype=torch.float32)
        self.x = torch.zeros(B, C, h, w, **f32)
        self.c_in = torch.zeros(1, **f32)
        self.t = torch.zeros(Bx, **f32)
        self.coeffs = torch.zeros(3, **f32)
        self.context = torch.zeros(Bx, *context_shape, device=self.device, dtype=dtype)
        self.extra = torch.zeros(B, extra_channels, h, w, device=self.device, dtype=dtype) if extra_channels else None
        self.g = 1.0
        self.graph = None
        self.out = None
        self.replays = 0
        if capture:
            self._capture(pool)

    # the captured body: reads only the static buffers
    def _body(self) -> torch.Tensor:
        x_in = (self.x * self.c_in).to(self.dtype)  # [B, 4, h, w]
        if self.extra is not None:
            x_in = torch.cat([x_in, self.extra], dim=1)
        if self.cfg:
            x_in = torch.cat([x_in, x_in])  # [2B, C, h, w]: uncond half first
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        out = self.unet(x_in, self.t, self.context).float()
        if self.cfg:
            uncond, cond = out.chunk(2)
            return ops.lincomb(self.coeffs, [self.x, uncond, cond])
        return ops.lincomb(self.coeffs[:2], [self.x, out])

    def _capture(self, pool) -> None:
        for hn in self.hypernetworks:
            hn.strength_buffer = self._strength_buffers[id(hn)]
        try:
            # Warm up on a side stream (Triton compiles and autotunes here, cuBLAS picks its
            # algorithms), then capture the same work.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._body()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = self._body()
        finally:
            for hn in self.hypernetworks:
                hn.strength_buffer = None

    @property
    def _strength_buffers(self):
        if not hasattr(self, "_sb"):
            self._sb = {id(hn): torch.zeros((), device=self.device, dtype=torch.float32)
                        for hn in self.hypernetworks}
        return self._sb

    def bind(self, context: torch.Tensor, guidance_scale: float, extra=None) -> "StepGraph":
        """Load one call's context ([Bx, L, dim], uncond rows first), guidance scale, extra
        channels and the hypernetworks' current strengths into the graph's buffers."""
        self.context.copy_(context)
        if self.extra is not None:
            self.extra.copy_(extra)
        self.g = float(guidance_scale)
        for hn in self.hypernetworks:
            self._strength_buffers[id(hn)].fill_(float(hn.strength))
        return self

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.x.copy_(x)
        self.c_in.fill_(1.0 / math.sqrt(sigma * sigma + 1.0))
        self.t.fill_(self.schedule.sigma_to_t(sigma))
        for i, c in enumerate(output_coefficients(self.prediction_type, sigma, self.g, self.cfg)):
            self.coeffs[i].fill_(c)
        self.replays += 1
        if self.graph is None:  # eager mode, same buffers
            for hn in self.hypernetworks:
                hn.strength_buffer = self._strength_buffers[id(hn)]
            try:
                return self._body().clone()
            finally:
                for hn in self.hypernetworks:
                    hn.strength_buffer = None
        self.graph.replay()
        # The sampler keeps x0 in its history; the next replay overwrites `out`.
        return self.out.clone()


class GraphCache:
    """The pipeline's captured graphs, least recently used dropped beyond `max_graphs`; all
    share one memory pool (they are replayed one at a time, under the pipeline's lock)."""

    def __init__(self, max_graphs: int = 8, capture: bool = True, channels_last: bool = False):
        self.max_graphs = max_graphs
        self.capture = capture
        self.channels_last = channels_last
        self.graphs: OrderedDict = OrderedDict()
        self.pool = None
        self.captures = 0

    def get(self, unet, schedule, prediction_type, *, batch, latent_shape, cfg, context_shape, dtype,
            extra_channels, hypernetworks, device) -> StepGraph:
        key = (batch, tuple(latent_shape), cfg, tuple(context_shape), extra_channels,
               tuple(id(h) for h in hypernetworks), str(dtype))
        g = self.graphs.get(key)
        if g is not None:
            self.graphs.move_to_end(key)
            return g
        if self.capture and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        g = StepGraph(unet, schedule, prediction_type, batch=batch, latent_shape=latent_shape, cfg=cfg,
                      context_shape=context_shape, dtype=dtype, extra_channels=extra_channels,
                      hypernetworks=hypernetworks, device=device, pool=self.pool, capture=self.capture,
                      channels_last=self.channels_last)
        self.captures += 1
        self.graphs[key] = g
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return g

    def clear(self) -> None:
        self.graphs.clear()
