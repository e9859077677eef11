"""`build(..., ray=...)`: the same shards made by a pool of Ray Data actors.

Each shard is one row of a Ray dataset (its index and its captions); `map_batches` sends rows
to a pool of actors, each holding a loaded pipeline (one GPU each; on CPU, a share of the
node's cores and this process's torch thread count), which generate the shard with
`run_shards` — the single-process code, so the bytes are the same — and write it to the
output folder themselves. The driver only plans, counts and writes the index. Ray restarts a
dead actor and reruns its task (Ray Data's defaults for actor pools); a shard is renamed into
place only when whole, so a killed worker loses no finished shard and leaves at most a
temporary file, removed by the next run.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass
class RayState:
    gpus: int
    cpus: int
    started: bool  # this process started the local cluster, so it shuts it down

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


def connect(address: str | None) -> RayState:
    """ray.init(address) (None or "": RAY_ADDRESS, else a new local cluster), once."""
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray Data: pip install 'fastdiff[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=True)
        started = True
    res = ray.cluster_resources()
    return RayState(int(res.get("GPU", 0)), int(res.get("CPU", 1)), started)


class ShardActor:
    """One loaded pipeline; called with a batch of shard rows, writes those shards."""

    def __init__(self, model, device, dtype, spec, out, threads):
        import torch

        import fastdiff

        if threads:
            torch.set_num_threads(threads)
        self.pipe = fastdiff.load(model, device=device, dtype=dtype)
        self.spec, self.out = spec, out

    def __call__(self, batch: dict) -> dict:
        from fastdiff.dataset.worker import run_shards
        from fastdiff.dataset.shards import Shard

        shards = [Shard(int(k), [tuple(c) for c in json.loads(caps)])
                  for k, caps in zip(batch["shard"], batch["captions"])]
        index, errors, images = [], [], []
        for shard, err in run_shards(self.pipe, shards, self.spec, self.out):
            index.append(shard.index)
            errors.append("" if err is None else f"{type(err).__name__}: {err}")
            images.append(0 if err is not None else len(shard.captions) * self.spec.images_per_caption)
        return {"shard": index, "error": errors, "images": images}


def run(todo, spec, out, *, model, device, dtype, workers, cpus, on_images=None):
    """Yields (shard index, None or an error message) as the actors finish shards."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # build() draws its own, in images
    import torch

    cuda = device.startswith("cuda")
    # On the CPU a float sum's rounding depends on how torch splits it over threads, so every
    # actor uses the thread count this process (and so a single-process run here) uses: the
    # same bytes whatever the number of workers. Ray reserves a share of the cores for each.
    threads = None if cuda else torch.get_num_threads()
    cores = 1 if cuda else max(1, cpus // workers)
    rows = [{"shard": s.index, "captions": json.dumps(s.captions, ensure_ascii=False)} for s in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(ShardActor, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
                        num_gpus=1 if cuda else 0, num_cpus=cores,
                        fn_constructor_kwargs=dict(model=os.fspath(model), device=device, dtype=dtype, spec=spec,
                                                   out=out, threads=threads))
    for row in ds.iter_rows():
        if on_images is not None and row["images"]:
            on_images(int(row["images"]))
        yield int(row["shard"]), (row["error"] or None)
