#!/usr/bin/env bash
# The measurements on a machine with a CUDA GPU, in order of importance, each step time-boxed so
# the others still run: build, launch-parameter sweeps (SWEEP=gn,ln,attn, off by default), CUDA
# tests (kernels, ops, graphs; TESTS=tests for all), pipeline benchmark vs diffusers, kernel
# benchmark, the engine under load (ENGINE=1, off by default). Logs and result JSON go to $OUT (default ./gpu-out); set FASTDIFF_COMMIT so the
# results record the commit measured. Needs torch with CUDA, triton, pybind11,
# scikit-build-core, transformers and diffusers; wheels placed in .whl/ are installed first
# (without an index), for machines that cannot reach one.
set -u
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc $((SECONDS - t0)) s"; tail -n "${TAIL:-15}" "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step build 240 python3 -m pip install --no-build-isolation --no-deps -e .
[ -z "${SWEEP:-}" ] || step sweep "${SWEEP_SECS:-240}" python3 benchmarks/sweep_kernels.py --only "$SWEEP"
[ -n "${NO_TESTS:-}" ] || step tests "${TEST_SECS:-200}" python3 -m pytest -q -p no:cacheprovider ${XDIST:--n 8} -m "${TEST_MARK:-cuda or not cuda}" ${TESTS:-tests/test_kernels.py tests/test_ops.py tests/test_graphs.py tests/test_kernels_compile.py}
[ -n "${NO_PIPELINE:-}" ] || step pipeline "${PIPE_SECS:-300}" python3 -m fastdiff.bench ${PIPE_ARGS:-}
[ -n "${NO_KERNELS:-}" ] || step kernels "${KERN_SECS:-180}" python3 benchmarks/bench_kernels.py
[ -z "${ENGINE:-}" ] || step engine "${ENGINE_SECS:-240}" python3 benchmarks/bench_engine.py --requests "${ENGINE_REQUESTS:-40}"
cp benchmarks/results/*.json "$OUT"/ 2>/dev/null
ls "$OUT"
