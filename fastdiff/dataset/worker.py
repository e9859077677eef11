"""Making shards with a loaded pipeline: the code the single process and each Ray actor run.

One call per caption (seed = base + i * n, num_images = n), so image j of caption i has seed
base + i * n + j. Several captions' calls are in flight at once, so the engine always has
images to batch (it batches the UNet evaluations of all running calls); results are taken in
caption order and written, each shard to a temporary name, renamed when whole.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fastdiff.dataset import shards as S


@dataclass
class Spec:
    """What decides a shard's bytes, beside the captions and the model."""

    images_per_caption: int
    seed: int
    format: str
    kwargs: dict  # Pipeline.submit arguments shared by every caption

    def submit(self, pipe, caption_index: int, text: str):
        n = self.images_per_caption
        return pipe.submit(text, seed=S.seed_of(self.seed, caption_index, 0, n), num_images=n, **self.kwargs)


def run_shards(pipe, shards, spec: Spec, out: str, *, window: int | None = None, on_images=None):
    """Generate and write `shards` in order; yields (shard, None) as each one is renamed into
    place, or (shard, error) when one of its captions failed (its partial file is removed and
    the other shards go on). Up to `window` captions are submitted ahead (default: enough for
    two full engine batches), so the engine keeps batching while results are encoded."""
    n = spec.images_per_caption
    if window is None:
        window = -(-2 * pipe.engine.max_batch // n) + 1
    items = ((s, i, t) for s in shards for i, t in s.captions)
    pending: deque = deque()
    failed: set = set()

    def top_up():
        while len(pending) < window:
            item = next(items, None)
            if item is None:
                return
            if item[0].index not in failed:
                try:
                    handle = spec.submit(pipe, item[1], item[2])
                except Exception as e:  # noqa: BLE001 - raised when its turn comes, like a failed result
                    handle = _Failed(e)
                pending.append((*item, handle))

    writer, current, left = None, None, 0
    try:
        top_up()
        while pending:
            shard, i, text, handle = pending.popleft()
            top_up()  # the next caption is queued before this one is waited for
            if shard.index in failed:
                handle.cancel()
                continue
            if current is not shard:
                writer, current, left = S.ShardWriter(out, shard.name), shard, len(shard.captions)
            try:
                result = handle.result()
            except Exception as e:  # noqa: BLE001 - a failed caption fails its shard, not the run
                failed.add(shard.index)
                writer.abort()
                writer, current = None, None
                yield shard, e
                continue
            for j, (image, params) in enumerate(zip(result.images, result.parameters)):
                writer.add_sample(S.sample_files(i, j, text, image, params, spec.format))
            if on_images is not None:
                on_images(len(result.images))
            left -= 1
            if left == 0:
                writer.close()
                writer, current = None, None
                yield shard, None
    finally:
        for *_, handle in pending:
            handle.cancel()
        if writer is not None:
            writer.abort()




class _Failed:
    """Stands in for the handle of a call that could not be submitted."""

    def __init__(self, error):
        self.error = error

    def result(self):
        raise self.error

    def cancel(self):
        pass
