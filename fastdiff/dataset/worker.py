"""Making shards with a loaded pipeline: the code the single process and each Ray actor run.

One call per caption (seed = base + i * n, num_images = n), so image j of caption i has seed
base + i * n + j. Several captions' calls are in flight at once, so the engine always has
images to batch (it batches the UNet evaluations of all running calls); results are encoded
on a few threads and written in caption order, each shard to a temporary name, renamed when
whole.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastdiff.dataset import shards as S

POLL_S = 0.002  # how long the loop sleeps when no result and no encoded image is ready


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


def run_shards(pipe, shards, spec: Spec, out: str, *, ahead: int | None = None, encoders: int | None = None,
               on_images=None):
    """Generate and write `shards` in order; yields (shard, None) as each one is renamed into
    place, or (shard, error) when one of its captions failed (its partial file is removed, the
    other shards go on).

    Calls are submitted while fewer than `ahead` images (default: two engine batches) are
    unfinished, so the engine always has work whatever this thread is doing; finished calls are
    decoded here and their images encoded by `encoders` threads (PNG, JPEG and WebP encoders
    release the GIL), then written in caption order."""
    n = spec.images_per_caption
    max_batch = pipe.engine.max_batch
    ahead = ahead or 2 * max_batch
    held = ahead + 4 * max_batch  # images submitted and not yet written: bounds memory
    items = ((s, i, t) for s in shards for i, t in s.captions)
    pending: deque = deque()  # (shard, caption index, text, handle), in caption order
    encoding: deque = deque()  # (shard, caption index, [future of a sample's files])
    failed: set = set()
    pool = ThreadPoolExecutor(encoders or min(4, os.cpu_count() or 1), thread_name_prefix="fastdiff-encode")

    def top_up():
        while True:
            unfinished = sum(n for *_, h in pending if not h.done())
            if unfinished >= ahead or (len(pending) + len(encoding)) * n >= held:
                return
            item = next(items, None)
            if item is None:
                return
            if item[0].index in failed:
                continue
            try:
                handle = spec.submit(pipe, item[1], item[2])
            except Exception as e:  # noqa: BLE001 - raised when its turn comes, like a failed result
                handle = _Failed(e)
            pending.append((*item, handle))

    writer, current, left = None, None, 0

    def fail(shard):
        nonlocal writer, current
        failed.add(shard.index)
        for s, _, _, h in pending:
            if s is shard:
                h.cancel()
        if current is shard:
            writer.abort()
            writer, current = None, None

    try:
        while True:
            top_up()
            if encoding and all(f.done() for f in encoding[0][2]):
                shard, i, futures = encoding.popleft()
                if shard.index in failed:
                    continue
                try:
                    samples = [f.result() for f in futures]
                except Exception as e:  # noqa: BLE001 - an image that cannot be encoded fails its shard
                    fail(shard)
                    yield shard, e
                    continue
                if current is not shard:
                    writer, current, left = S.ShardWriter(out, shard.name), shard, len(shard.captions)
                for files in samples:
                    writer.add_sample(files)
                if on_images is not None:
                    on_images(len(samples))
                left -= 1
                if left == 0:
                    writer.close()
                    writer, current = None, None
                    yield shard, None
            elif pending and pending[0][3].done():
                shard, i, text, handle = pending.popleft()
                if shard.index in failed:
                    continue
                try:
                    result = handle.result()
                except Exception as e:  # noqa: BLE001 - a failed caption fails its shard, not the run
                    fail(shard)
                    yield shard, e
                    continue
                encoding.append((shard, i, [pool.submit(S.sample_files, i, j, text, image, params, spec.format)
                                            for j, (image, params) in enumerate(zip(result.images,
                                                                                    result.parameters))]))
            elif pending or encoding:
                time.sleep(POLL_S)  # nothing ready: the engine and the encoders are busy
            else:
                return
    finally:
        for *_, handle in pending:
            handle.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        if writer is not None:
            writer.abort()


class _Failed:
    """Stands in for the handle of a call that could not be submitted."""

    def __init__(self, error):
        self.error = error

    def done(self):
        return True

    def result(self):
        raise self.error

    def cancel(self):
        pass
