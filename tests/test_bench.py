"""`fastdiff bench` runs end to end on CPU in its reduced configuration (timings not compared)."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")


def test_fastdiff_bench_quick_writes_results(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastdiff", "bench", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = tmp_path.glob("pipeline-*.json")
    doc = json.loads(path.read_text())
    for key in ("device", "torch", "diffusers", "git_commit", "configuration", "results"):
        assert key in doc
    rows = doc["results"]
    assert {"unet_step", "vae_decode", "text_encode", "image_2", "image_3"} <= set(rows)
    assert rows["unet_step"]["rel_err_eager_vs_diffusers"] <= 1e-4  # same weights, same maths
    for row in rows.values():
        for k, v in row.items():
            if k.startswith("ms_"):
                assert v > 0
