import os

# The Triton interpreter must be switched on before any kernel module is imported.
# torch.cuda is asked first, and only then is anything of fastdiff's imported.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random SD 1.x diffusers folder with CLIP's real vocabulary (tests/checkpoints.py)."""
    from checkpoints import save_tiny_sd1

    return save_tiny_sd1(tmp_path_factory.mktemp("tiny_sd") / "tiny-sd1")
