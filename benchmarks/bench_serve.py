"""`fastdiff serve` under load, on loopback: images/s and p50/p95/p99 latency at 1, 4 and 16
concurrent clients, for the server with batching and with --max-batch 1, in one run.

Each server is the real command (`python -m fastdiff serve`, warmed up before its port opens)
in a process of its own; the clients are threads of this process speaking HTTP (httpx). Each
client sends its next txt2img request as soon as the last one is answered, until it has sent
its share of the level's requests or the level's time is up (both bounded). A direct pipe()
call on an idle machine is the latency reference.

Targets (CPU, the shipped model): at 16 clients the batching server makes >= 2x the images/s
of --max-batch 1; at 1 client its p50 latency is <= 1.1x a direct pipe() call.

    python benchmarks/bench_serve.py                 # CPU: the shipped model, 64x64, 20 steps
    python benchmarks/bench_serve.py --quick         # smoke run, results to a temp folder
    python benchmarks/bench_serve.py --model PATH    # e.g. an SD 1.5 checkpoint on a GPU
"""
from __future__ import annotations

import argparse
import datetime
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import RESULTS, commit, percentiles, write  # noqa: E402



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`fastdiff serve` in a subprocess; ready once /health answers."""

    def __init__(self, args, max_batch: int):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "fastdiff", "serve", "--port", str(self.port), "--max-batch", str(max_batch),
               "--queue-limit", "256", "--log-level", "warning"]
        if args.model:
            cmd += ["--model", args.model]
        if args.device:
            cmd += ["--device", args.device]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fastdiff serve exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError("fastdiff serve did not start in 300 s")
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def body(args, i: int) -> dict:
    return {"prompt": f"a red circle and a blue square, number {i}", "negative_prompt": "blurry", "seed": 1000 + i,
            "steps": args.steps, "cfg_scale": args.guidance, "sampler_name": "Euler a",
            "width": args.size, "height": args.size}


def load_level(url: str, args, clients: int, requests: int, time_limit: float) -> dict:
    """`clients` threads share `requests` requests (each sends its next when its last is
    answered), stopping early at `time_limit` seconds."""
    import httpx

    latencies, errors, lock = [], [], threading.Lock()
    counter = iter(range(requests))
    t_start = time.perf_counter()

    def client():
        with httpx.Client(base_url=url, timeout=600) as c:
            while time.perf_counter() - t_start < time_limit:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = c.post("/sdapi/v1/txt2img", json=body(args, i))
                dt = time.perf_counter() - t0
                with lock:
                    (latencies if r.status_code == 200 else errors).append(dt if r.status_code == 200 else r.status_code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    return {"clients": clients, "requests": len(latencies), "errors": errors, "wall_s": wall,
            "img_s": len(latencies) / wall, **percentiles(latencies)}


def direct_latency(args, n: int) -> float:
    """Median seconds of a direct pipe() call (PIL output, as the server makes) on an idle machine."""
    import fastdiff

    pipe = fastdiff.load(args.model, device=args.device)
    b = body(args, 0)
    kw = dict(negative_prompt=b["negative_prompt"], steps=args.steps, guidance_scale=args.guidance,
              sampler="euler_ancestral", width=args.size, height=args.size)
    pipe(b["prompt"], seed=0, **kw)  # warm-up, as the server's
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        pipe(b["prompt"], seed=i, **kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the model that ships with fastdiff")
    p.add_argument("--device", default=None)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--max-batch", type=int, default=16, help="the batching server's --max-batch (default 16)")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=48, help="requests per level (at least 2 per client)")
    p.add_argument("--level-seconds", type=float, default=120, help="time bound of one level")
    p.add_argument("--quick", action="store_true", help="4 steps, 16 requests per level, results to a temp folder")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.requests = 4, 16
    levels = [int(c) for c in args.clients.split(",")]

    import torch

    direct_s = direct_latency(args, 8)
    print(f"direct pipe(): {direct_s:.3f} s", file=sys.stderr)
    runs = {}
    for name, max_batch in (("batching", args.max_batch), ("max_batch_1", 1)):
        server = Server(args, max_batch)
        try:
            runs[name] = {"max_batch": max_batch, "levels": []}
            for c in levels:
                n = max(args.requests, 2 * c) if c > 1 else max(8, args.requests // 4)
                r = load_level(server.url, args, c, n, args.level_seconds)
                runs[name]["levels"].append(r)
                print(f"{name} @{c:>2} clients: {r['img_s']:.2f} img/s, p50 {r['p50_s']:.3f} s, "
                      f"p95 {r['p95_s']:.3f} s, p99 {r['p99_s']:.3f} s ({r['requests']} requests)", file=sys.stderr)
        finally:
            server.stop()

    def level(name, c):
        return next(x for x in runs[name]["levels"] if x["clients"] == c)

    top, low = max(levels), min(levels)
    targets = {
        f"images/s batching / max_batch 1 @{top} clients (>= 2)": level("batching", top)["img_s"] / level("max_batch_1", top)["img_s"],
        f"p50 latency batching @{low} client / direct pipe() (<= 1.1)": level("batching", low)["p50_s"] / direct_s,
    }
    vals = list(targets.values())
    met = {"throughput": vals[0] >= 2, "latency": vals[1] <= 1.1}
    cuda = torch.cuda.is_available() and args.device != "cpu"
    doc = {
        "kind": "serve", "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, "
        f"{torch.get_num_threads()} threads)", "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "python": platform.python_version(), "git_commit": commit(), "model": args.model or "shapes-model (shipped)",
        "size": f"{args.size}x{args.size}", "steps": args.steps, "sampler": "Euler a", "guidance_scale": args.guidance,
        "quick": args.quick,
        "compares": "fastdiff serve with batching vs --max-batch 1, txt2img over loopback HTTP, clients in closed "
                    "loops; a direct pipe() call for the latency reference",
        "direct_pipe_s": direct_s, "runs": runs, "targets": targets, "targets_met": met,
    }
    for k, v in targets.items():
        print(f"{k}: {v:.2f}", file=sys.stderr)
    print(write(doc, args.out, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
