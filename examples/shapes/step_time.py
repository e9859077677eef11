"""Time one training step of the shapes UNet and text encoder (train.py's unet stage: forward,
backward and AdamW at UNET_BATCH) in each mode, to see what buys more steps in the hour.

    python -m examples.shapes.step_time [--modes fp32,bf16,compile] [--steps 10]

fp32: as train.py runs; bf16: the same under torch.autocast(cpu, bfloat16) (AMX/AVX512-BF16
where the CPU has them); compile: torch.compile'd modules (the first step's compile time is
printed apart). Random latents, real captions; the numbers are seconds per step.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from examples.shapes import data as D
from examples.shapes import train as T


def time_mode(mode: str, steps: int) -> tuple[float, float]:
    """-> (seconds of the first step, mean seconds of the `steps` after 3 more warm-up steps)."""
    te, unet = T.build_text_unet(0)
    vocab = T.Vocab()
    ids = vocab.ids([D.sample(i, 0, "train", "mixed")[1] for i in range(T.UNET_BATCH)])
    table, params = T.trainable(te, unet, vocab)
    opt = torch.optim.AdamW(params, lr=1e-4)
    acp, g = T.alphas_cumprod(), torch.Generator().manual_seed(0)
    z = torch.randn(T.UNET_BATCH, 4, 8, 8, generator=g)
    run_te, run_unet = (torch.compile(te), torch.compile(unet)) if mode == "compile" else (te, unet)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = T.v_loss(run_unet, z, run_te(inputs_embeds=table[ids]), g, acp)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return first, (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="fp32,bf16,compile")
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    modes = a.modes.split(",")
    unknown = set(modes) - {"fp32", "bf16", "compile"}
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {T.UNET_BATCH}")
    for mode in modes:
        first, per = time_mode(mode, a.steps)
        print(f"{mode:8s} {per:.3f} s/step (first step {first:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
