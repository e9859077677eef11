"""pytest-benchmark face of `fastdiff bench` (fastdiff/bench.py): fastdiff against diffusers'
StableDiffusionPipeline on identical random weights, SD 1.5 architecture on CUDA, a reduced
configuration on CPU (no timing asserts).

    pytest benchmarks/bench_pipeline.py --benchmark-enable
    fastdiff bench [--compile]        # every row, plus the results JSON
"""
import math

import pytest

from fastdiff.bench import CUDA, Bench, build_model_folder


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tiny = not CUDA
    root = tmp_path_factory.mktemp("model")
    build_model_folder(root, tiny)
    return Bench(root, tiny)


@pytest.mark.parametrize("row", ["unet_step", "vae_decode", "text_encode", "image"])
def test_pipeline_vs_diffusers(benchmark, bench, row):
    fn = {"unet_step": bench.unet_step, "vae_decode": bench.vae_decode, "text_encode": bench.text_encode,
          "image": lambda: bench.image(bench.steps[0], reps=1)}[row]
    benchmark.pedantic(fn, rounds=1, iterations=1)
    key = "image_%d" % bench.steps[0] if row == "image" else row
    benchmark.extra_info.update(bench.rows[key])
    assert all(math.isfinite(v) and v > 0 for k, v in bench.rows[key].items() if k.startswith("ms_"))
