#!/usr/bin/env bash
# Installs fastdiff (editable) with the given extras: bash scripts/install.sh [EXTRAS]
#
# torch first, and only when none is importable: an existing torch (CPU or CUDA build) is left
# alone. What is installed is $TORCH_SPEC, any pip requirement or wheel path, by default
# torch==2.13.0 from PyPI. On Linux x86_64 PyPI's torch==2.13.0 is the CUDA-enabled build,
# which pulls several GB of NVIDIA libraries (it runs on CPU-only machines too); pip reuses a
# matching wheel from its cache if it has one. For a smaller install, install the torch build
# you want before running this script, or point TORCH_SPEC at it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if python -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: using the installed torch $(python -c 'import torch; print(torch.__version__)')"
else
  spec="${TORCH_SPEC:-torch==2.13.0}"
  if [ -z "${TORCH_SPEC:-}" ]; then
    echo "install.sh: no torch found; installing $spec from PyPI (on Linux x86_64 the CUDA-enabled build, several GB)"
  else
    echo "install.sh: no torch found; installing TORCH_SPEC=$spec"
  fi
  python -m pip install --quiet "$spec"
fi
if [ -n "$extras" ]; then
  python -m pip install --quiet -e ".[$extras]"
else
  python -m pip install --quiet -e .
fi
