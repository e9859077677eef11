"""CUDA graphs for the UNet call of a batch of model evaluations.

One graph per (row bucket, input shape, context shape, hypernetwork set, dtype): the engine's
batches vary in size from step to step as requests join and leave, so a batch of R rows runs in
the graph of the smallest bucket >= R (1, 2, 4, 8, 16, 32, ...), its spare rows left holding
whatever they held (rows never mix, so they cannot disturb the real ones). Everything that
changes between replays lives in static device buffers refilled with asynchronous copies:

- the scaled inputs x_in (extra channels included), the per-row timesteps and contexts;
- each hypernetwork's strength, a device scalar its modules read inside the graph.

So requests joining or leaving, new prompts, other guidance scales and strengths never cause a
re-capture. The per-image guidance combination and the sampler update run outside the graph
(`BatchDenoiser`, one fused `lincomb` each).

`capture=False` runs the same body eagerly on the same static buffers: CPU tests use it to check
the buffer logic without a GPU.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

from fastdiff.denoiser import hypernetworks_applied

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket(rows: int) -> int:
    for b in BUCKETS:
        if rows <= b:
            return b
    return rows


class UNetGraph:
    """One captured UNet call on static buffers: x_in [R, Cin, h, w], t [R], context [R, L, dim]."""

    def __init__(self, unet, *, rows: int, input_shape, context_shape, dtype, device, hypernetworks=(),
                 pool=None, capture: bool = True, channels_last: bool = False):
        self.unet = unet
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.x = torch.zeros(rows, *input_shape, device=self.device, dtype=dtype)
        self.t = torch.zeros(rows, device=self.device, dtype=torch.float32)
        self.context = torch.zeros(rows, *context_shape, device=self.device, dtype=dtype)
        self.hypernetworks = list(hypernetworks)
        self.strengths = [torch.zeros((), device=self.device, dtype=torch.float32) for _ in self.hypernetworks]
        self.graph = None
        self.out = None
        if capture:
            self._capture(pool)

    def _body(self) -> torch.Tensor:
        with hypernetworks_applied(self.unet, list(zip(self.hypernetworks, self.strengths))):
            x = self.x.contiguous(memory_format=torch.channels_last) if self.channels_last else self.x
            return self.unet(x, self.t, self.context)

    def _capture(self, pool) -> None:
        # Warm up on a side stream (Triton compiles and autotunes here, cuBLAS picks its
        # algorithms), then capture the same work.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a user's callback copying a preview, say)
        # neither fail nor join the capture; they run on their own streams.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = self._body()

    def __call__(self, x_in, t, context, strengths) -> torch.Tensor:
        """Fill the first R rows, replay, return the output's first R rows (a view of the static
        output: valid until the next replay)."""
        R = x_in.shape[0]
        self.x[:R].copy_(x_in, non_blocking=True)
        self.t[:R].copy_(t, non_blocking=True)
        self.context[:R].copy_(context, non_blocking=True)
        for buf, s in zip(self.strengths, strengths):
            buf.fill_(float(s))
        if self.graph is None:  # eager, same buffers
            return self._body()[:R]
        self.graph.replay()
        return self.out[:R]


class GraphCache:
    """The captured graphs of one engine, least recently used dropped beyond `max_graphs`; all
    share one memory pool (only the engine thread replays them, one at a time).

    `exclusive()`: a context manager held while capturing, so that no other thread launches
    CUDA work into the capture (the engine passes its device lock)."""

    def __init__(self, max_graphs: int = 16, capture: bool = True, channels_last: bool = False,
                 exclusive=None):
        self.max_graphs = max_graphs
        self.capture = capture
        self.channels_last = channels_last
        self.exclusive = exclusive or contextlib.nullcontext
        self.graphs: OrderedDict = OrderedDict()
        self.pool = None
        self.captures = 0

    def get(self, unet, *, rows, input_shape, context_shape, dtype, device, hypernetworks=()) -> UNetGraph:
        key = (bucket(rows), tuple(input_shape), tuple(context_shape), tuple(id(h) for h in hypernetworks), str(dtype))
        g = self.graphs.get(key)
        if g is not None:
            self.graphs.move_to_end(key)
            return g
        with self.exclusive():
            if self.capture and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            g = UNetGraph(unet, rows=key[0], input_shape=input_shape, context_shape=context_shape, dtype=dtype,
                          device=device, hypernetworks=hypernetworks, pool=self.pool, capture=self.capture,
                          channels_last=self.channels_last)
        self.captures += 1
        self.graphs[key] = g
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return g

    def run(self, unet, x_in, t, context, pairs) -> torch.Tensor:
        hns = [h for h, _ in pairs]
        g = self.get(unet, rows=x_in.shape[0], input_shape=x_in.shape[1:], context_shape=context.shape[1:],
                     dtype=x_in.dtype, device=x_in.device, hypernetworks=hns)
        return g(x_in, t, context, [s for _, s in pairs])

    def clear(self) -> None:
        self.graphs.clear()
