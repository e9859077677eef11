"""scripts/random_model.py: the README's main command runs on the folder it writes."""
import importlib.util
import os

import numpy as np

import fastdiff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_random_model_folder_loads_and_generates(tmp_path):
    spec = importlib.util.spec_from_file_location("random_model", os.path.join(ROOT, "scripts", "random_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.write(str(tmp_path / "m"), size=64, seed=0)
    pipe = fastdiff.load(out, device="cpu")
    assert pipe.info.native_size == 64 and pipe.info.family == "sd1"
    a = pipe("a red balloon", steps=2, seed=1, output_type="np").images
    b = pipe("a blue balloon", steps=2, seed=1, output_type="np").images
    assert a.shape == (1, 64, 64, 3) and a.dtype == np.uint8
    assert (a != b).any()  # the prompt reaches the image
