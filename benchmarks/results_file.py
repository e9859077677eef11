"""What every load benchmark shares: the commit measured, latency percentiles, and writing the
result JSON as benchmarks/results/<kind>-<device>-<date>-<commit>.json."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def commit() -> str:
    """FASTDIFF_COMMIT wins: a copied working tree may carry a stale .git."""
    if os.environ.get("FASTDIFF_COMMIT"):
        return os.environ["FASTDIFF_COMMIT"]
    try:
        return subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def percentiles(xs) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {"p50_s": float(np.percentile(a, 50)), "p95_s": float(np.percentile(a, 95)),
            "p99_s": float(np.percentile(a, 99)), "mean_s": float(a.mean()), "max_s": float(a.max())}


def write(doc: dict, out: str, quick: bool) -> Path:
    """Write `doc` (with kind, device, date, git_commit) under `out`; a --quick run left at the
    default folder goes to a temporary one instead, so smoke runs never look like results."""
    folder = Path(out)
    if quick and folder == RESULTS:
        folder = Path(tempfile.mkdtemp(prefix=f"fastdiff-bench-{doc['kind']}-"))
    folder.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", doc["device"]).strip("-")
    path = folder / f"{doc['kind']}-{device}-{doc['date']}-{doc['git_commit']}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
