"""The package as installed: entry points, the compiled core, and the wheel's layout."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import fastdiff

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_python_m_fastdiff_help():
    r = _run(sys.executable, "-m", "fastdiff", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: fastdiff")
    for cmd in ("generate", "info", "bench"):
        assert cmd in r.stdout


def test_console_script_matches_version():
    script = shutil.which("fastdiff", path=sysconfig.get_path("scripts"))
    assert script, "the `fastdiff` console script is not installed next to this Python"
    r = _run(script, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == fastdiff.__version__


def test_core_is_compiled_and_links_no_torch():
    from fastdiff import _core

    path = Path(_core.__file__)
    assert path.suffix == ".so" or path.suffix == ".pyd"
    if shutil.which("ldd"):
        out = _run("ldd", str(path)).stdout
        # the libraries' names and paths, not their load addresses: "(0x...7f09ca0c1000)"
        # holds "c10" by chance often enough to fail a run
        linked = re.sub(r"\(0x[0-9a-f]+\)", "", out)
        assert "libc.so" in linked, out  # ldd's output is what this reads
        assert "torch" not in linked and "c10" not in linked, out


def test_kernels_install_under_fastdiff_namespace():
    import fastdiff.triton_kernels as tk

    assert Path(tk.__file__).parent == ROOT / "triton_kernels"


def test_wheel_layout(tmp_path):
    """The wheel ships our kernels as fastdiff/triton_kernels and no top-level triton_kernels
    (Triton's own repository publishes a package of that name)."""
    r = _run(
        sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
        "-w", str(tmp_path), str(ROOT),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = tmp_path.glob("fastdiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastdiff/triton_kernels/__init__.py" in names
    assert "fastdiff/__init__.py" in names
    assert any(n.startswith("fastdiff/_core") and n.endswith(".so") for n in names)
    top = {n.split("/")[0] for n in names}
    assert "triton_kernels" not in top, sorted(top)
    assert not any(n.startswith(("tests/", "benchmarks/", "csrc/")) for n in names)
    # The data the package reads at run time: CLIP's vocabulary and the shipped shapes model.
    assert "fastdiff/data/bpe_simple_vocab_16e6.txt.gz" in names
    shipped = ROOT / "fastdiff" / "data" / "shapes-model"
    files = [f for f in sorted(shipped.rglob("*")) if f.is_file()]
    assert len(files) >= 9, files  # 3 configs + 3 weights, scheduler, index, hypernetwork, embedding
    for f in files:
        assert f"fastdiff/data/shapes-model/{f.relative_to(shipped).as_posix()}" in names, f
