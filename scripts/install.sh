#!/usr/bin/env bash
# Installs fastdiff (editable) with the given extras on a fresh machine.
# torch comes first and pinned: an unpinned torch would pull several GB of CUDA packages, and
# 2.13.0 is the CPU build this workplace keeps on disk. An existing torch is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet torch==2.13.0
fi
if [ -n "$extras" ]; then
  python -m pip install --quiet -e ".[$extras]"
else
  python -m pip install --quiet -e .
fi
