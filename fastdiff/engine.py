"""The engine: continuous batching of model evaluations across requests.

Each image being generated is a `Job`. Its sampler is the C++ loop of fastdiff._core, run in a
worker thread of its own; the loop's `denoise(x, sigma)` callback posts the evaluation to the
engine and blocks until the engine has made it. The engine thread (one per pipeline):

    admit queued jobs (FIFO) while fewer than `max_batch` are active
    wait until every active job has posted its next evaluation (or finished)
    take the oldest job's group: the waiting jobs whose Conditioning keys match (same latent
      size, context length, extra channels, hypernetworks and strengths)
    one UNet call for the group (BatchDenoiser: per-row sigma, timestep, context; per-image
      guidance), hand each job its x0, repeat

A job that arrives joins at the next evaluation; a finished or cancelled one leaves at once and
its slot is refilled from the queue. Because a UNet row's result does not depend on the other
rows of its batch, an image is the same whether it ran alone or joined others mid-way: bitwise
in fp32 on the CPU, within fp16 rounding on CUDA.

Policies (for comparison in benchmarks/bench_engine.py): "continuous" (the default, above);
"static": new jobs are admitted only when every active job has finished (a batch runs to the
end before the next starts); "serial": as static, and only the jobs of one call at a time.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque

import torch

from fastdiff import sampling

POLICIES = ("continuous", "static", "serial")

# job states
QUEUED, STARTING, WAITING, RUNNING, BUSY, DONE = "queued", "starting", "waiting", "running", "busy", "done"


class Cancelled(Exception):
    """The request was cancelled before it finished."""


class Job:
    """One image: its sampler, its conditioning and its progress. Created by the Pipeline,
    run by the engine; `done` is set when `output` (x0 [1, C, h, w]) or `error` is known."""

    _arrivals = itertools.count()

    def __init__(self, cond, x, sigmas, sampler: str, *, noise, eta=1.0, s_noise=1.0, call=None, on_step=None,
                 on_done=None):
        self.cond = cond  # denoiser.Conditioning
        self.x = x  # [1, C, h, w] fp32, at scale sigmas[0]
        self.sigmas = sigmas
        self.sampler = sampler
        self.noise = noise  # noise(sigma, sigma_next) -> [1, C, h, w]
        self.eta, self.s_noise = eta, s_noise
        self.call = call  # jobs of one call share it (the "serial" policy runs one call at a time)
        self.on_step = on_step  # on_step(job, {i, x, sigma, denoised}) in the job's thread
        self.on_done = on_done  # on_done(job) once output or error is set (under the engine's lock)
        self.arrival = next(Job._arrivals)
        self.state = QUEUED
        self.cancelled = False
        self.pending = None  # (x, sigma) posted to the engine
        self.result = None  # x0 handed back
        self.error = None
        self.output = None
        self.steps_done = 0
        self.done = threading.Event()
        self.ready = threading.Event()  # set when the engine hands back `result` (or `error`)


class _DeviceLock:
    """Many threads may launch device work at once ("shared"); capturing a CUDA graph needs the
    device to itself ("exclusive"). A thread holding it shared may take it exclusive (the engine
    thread captures in the middle of its own evaluation): it then waits for the others only."""

    def __init__(self):
        self._cv = threading.Condition()
        self._shared = 0
        self._owner = None  # the thread holding it exclusive
        self._depth = 0
        self._local = threading.local()

    def _mine(self) -> int:
        return getattr(self._local, "n", 0)

    @contextlib.contextmanager
    def shared(self):
        me = threading.get_ident()
        with self._cv:
            while self._owner not in (None, me):
                self._cv.wait()
            self._shared += 1
            self._local.n = self._mine() + 1
        try:
            yield
        finally:
            with self._cv:
                self._shared -= 1
                self._local.n -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        me = threading.get_ident()
        with self._cv:
            while self._owner not in (None, me) or self._shared - self._mine() > 0:
                self._cv.wait()
            self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cv:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                self._cv.notify_all()


class Engine:
    """Batches the model evaluations of every active job. `evaluate` is a BatchDenoiser:
    evaluate([(cond, x, sigma), ...]) -> [x0, ...]."""

    def __init__(self, evaluate, *, max_batch: int, policy: str = "continuous"):
        self.evaluate = evaluate
        self.max_batch = max_batch
        self.policy = policy
        self.device_lock = _DeviceLock()
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._active: list[Job] = []
        self._unposted = 0  # active jobs that are computing, not waiting for an evaluation
        self._thread = None
        self.batches: deque[int] = deque(maxlen=10000)  # images in each recent UNet call
        self.on_batch: list = []  # f(images) after each UNet call, in the engine thread (metrics)

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @max_batch.setter
    def max_batch(self, n) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {n!r}")
        self._max_batch = n

    @property
    def policy(self) -> str:
        return self._policy

    @policy.setter
    def policy(self, p) -> None:
        if p not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {p!r}")
        self._policy = p

    # ------------------------------------------------------------------ clients

    def submit(self, jobs) -> None:
        """Queue jobs (FIFO); they start as slots free."""
        with self._cv:
            for j in jobs:
                self._queue.append(j)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fastdiff-engine", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def cancel(self, jobs) -> None:
        """Cancel jobs: a queued one never starts, a running one stops at its next evaluation;
        either ends with `error` = Cancelled. Finished jobs are left as they are."""
        with self._cv:
            for j in jobs:
                if j.state == DONE:
                    continue
                j.cancelled = True
                if j.state == QUEUED:
                    self._queue.remove(j)
                    self._finish(j, None, Cancelled("cancelled before it started"))
            self._cv.notify_all()

    def stats(self) -> dict:
        with self._cv:
            return {"queued": len(self._queue), "active": len(self._active)}

    # ------------------------------------------------------------------ job threads

    def _finish(self, job, output, error) -> None:  # under self._cv
        if job.state in (STARTING, BUSY):
            self._unposted -= 1
        job.output, job.error, job.state = output, error, DONE
        if job in self._active:
            self._active.remove(job)
        job.done.set()
        if job.on_done is not None:
            job.on_done(job)
        self._cv.notify_all()

    def _run_job(self, job: Job) -> None:
        def denoise(x, sigma):
            with self._cv:
                if job.cancelled:
                    raise Cancelled("cancelled")
                job.pending, job.state = (x, sigma), WAITING
                job.ready.clear()
                self._unposted -= 1
                if not self._unposted:  # the last one the engine waited for
                    self._cv.notify_all()
            job.ready.wait()  # the engine sets state, result or error before it sets ready
            if job.cancelled:
                raise Cancelled("cancelled")
            if job.error is not None:
                raise job.error
            out, job.result = job.result, None
            return out

        def callback(d):
            job.steps_done = d["i"] + 1
            if job.on_step is not None:
                job.on_step(job, d)

        output, error = None, None
        try:
            with torch.inference_mode():  # thread-local: each worker thread sets its own
                output = sampling.sample(denoise, job.x, job.sigmas, job.sampler, noise_sampler=job.noise,
                                         callback=callback, eta=job.eta, s_noise=job.s_noise)
        except BaseException as e:  # handed to the caller, never lost in this thread
            error = e
        with self._cv:
            self._finish(job, output, error)

    # ------------------------------------------------------------------ the engine thread

    def _admit(self) -> None:  # under self._cv
        if self.policy != "continuous" and self._active:
            return
        call = self._queue[0].call if self._queue else None
        while self._queue and len(self._active) < self.max_batch:
            if self.policy == "serial" and self._queue[0].call is not call:
                break
            job = self._queue.popleft()
            job.state = STARTING
            self._unposted += 1
            self._active.append(job)
            threading.Thread(target=self._run_job, args=(job,), name="fastdiff-job", daemon=True).start()

    def _next_batch(self):
        """Blocks until a batch is ready; None when there is no more work (the thread exits)."""
        with self._cv:
            while True:
                self._admit()
                if not self._active:
                    self._thread = None
                    return None
                for j in self._active:
                    if j.cancelled and j.state == WAITING:
                        self._hand_back(j)  # it raises Cancelled and leaves
                if not self._unposted:
                    break
                self._cv.wait()
            first = self._active[0]  # the oldest job's group goes first (FIFO)
            batch = [j for j in self._active if j.cond.key == first.cond.key
                     and tuple(j.pending[0].shape) == tuple(first.pending[0].shape)]
            for j in batch:
                j.state = RUNNING
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            results, error = None, None
            try:
                with self.device_lock.shared(), torch.inference_mode():
                    results = self.evaluate([(j.cond, *j.pending) for j in batch])
            except BaseException as e:  # the batch's jobs fail with it; the engine goes on
                error = e
            for f in self.on_batch:
                f(len(batch))
            with self._cv:
                self.batches.append(len(batch))
                for i, j in enumerate(batch):
                    if error is not None:
                        j.error = error
                    else:
                        j.result = results[i]
                    self._hand_back(j)

    def _hand_back(self, job) -> None:  # under self._cv
        job.pending, job.state = None, BUSY
        self._unposted += 1
        job.ready.set()
