#!/usr/bin/env bash
# One call on a GPU machine that tells the whole truth about the CUDA backend:
#   env      device, driver, torch/CUDA versions, measured bf16 matmul and copy ceilings
#   wheels   open_clip / inf-cl and their missing dependencies from .whl/ (no network there)
#   build    the extension with SEMCOMP_CUDA=ON for the local GPU's architecture
#   tests    the kernel test files with CUDA parametrisation on, then the CUDA-graph tests,
#            and `semcomp compress --device cuda` against --device cpu (byte identity)
#   sanitize compute-sanitizer memcheck / racecheck / synccheck over benchmarks/gpu_smoke.py
#   bench    benchmarks/run_all.py --device cuda (JSON under benchmarks/results/ and $OUT)
#   benchcli `semcomp bench all --device cuda --dtype bfloat16` (JSON and plot in $OUT)
# Every stage runs whatever the previous ones did (a failing test does not stop the
# benchmarks); each stage's exit status goes to $OUT/summary.txt, the full log to
# $OUT/gpu_check.log.
#
#   benchmarks/gpu_check.sh [OUTDIR] [--stages "env build tests sanitize bench benchcli"] [--dry-run]
#
# --dry-run prints the commands without running them (CI runs it to keep the script valid).
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${OUT:-gpu_out}"
STAGES="env wheels build tests sanitize bench benchcli"
DRY=0
BENCH_ARGS="${SEMCOMP_BENCH_ARGS:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stages) STAGES="$2"; shift ;;
    --bench-args) BENCH_ARGS="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) OUTDIR="$1" ;;
  esac
  shift
done
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# The GPU machine's copy of the tree may have no .git: benchmarks read the commit from here.
export SEMCOMP_GIT_COMMIT="${SEMCOMP_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || cat .gpu_commit 2>/dev/null || echo unknown)}"

run_stage() {  # name, timeout seconds, command...  (selected by name, or by ${STAGE_NAME})
  local name="$1" limit="$2"; shift 2
  case " $STAGES " in *" ${STAGE_NAME:-$name} "*) ;; *) return 0 ;; esac
  if [ "$DRY" = 1 ]; then
    echo "[dry-run] $name (timeout ${limit}s): $*"
    echo "$name dry-run" >>"$SUMMARY"
    return 0
  fi
  local t0=$SECONDS
  echo "===== $name: $* =====" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" bash -c "set -o pipefail; $*" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$SUMMARY" "$LOG"
}

# ---- env: what machine, and its two ceilings -----------------------------------------
run_stage env 120 "nvidia-smi; nvcc --version | tail -2; $PY -m benchmarks.gpu_ceilings --out '$OUTDIR/ceilings.json'"

# ---- wheels: peers and their dependencies, carried in .whl/ ----------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  run_stage wheels 120 "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/semcomp_site .whl/*.whl"
  export PYTHONPATH="/tmp/semcomp_site${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- build ---------------------------------------------------------------------------------
# The compiler must be the one torch was built with and link libstdc++ dynamically. The GPU
# image sets CC/CXX to a /opt/gcc wrapper that links libstdc++ statically: the extension then
# carries its own copy of the iostream code, and formatting any TORCH_CHECK message crashed
# the process. The system GCC is used unless SEMCOMP_CXX names another.
if [ -x /usr/bin/g++ ]; then
  export CXX="${SEMCOMP_CXX:-/usr/bin/g++}" CC="${SEMCOMP_CC:-/usr/bin/gcc}"
  export CUDAHOSTCXX="$CXX"
fi
ARCH="${SEMCOMP_CUDA_ARCH:-$($PY -c 'import torch; p=torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}")' 2>/dev/null || echo 90)}"
run_stage build 420 "SEMCOMP_CUDA=ON CMAKE_ARGS='-DCMAKE_CUDA_ARCHITECTURES=$ARCH' CMAKE_BUILD_PARALLEL_LEVEL=\$(nproc) $PY -m pip install -q --no-build-isolation --no-deps -e . && $PY -c 'import semcomp_ext, json; print(json.dumps(semcomp_ext.build_info()))' && $PY -m benchmarks.native_error_check"

# ---- tests: every op test over cpu and cuda, then the CUDA-graph capture tests -------------
KERNEL_TESTS="tests/test_infonce.py tests/test_segment_gather.py tests/test_pair_mean.py tests/test_clip_loss.py tests/test_cuda.py tests/test_distributed.py tests/test_siglip.py tests/test_api_defects.py tests/test_compress_device.py"
run_stage tests 420 "$PY -m pytest -q -p no:cacheprovider -o addopts='-ra' $KERNEL_TESTS"

# ---- sanitize: small cases of every kernel (only semcomp's kernels are instrumented) -------
SAN="compute-sanitizer --error-exitcode 9 --kernel-name kns=semcomp"
for tool in memcheck racecheck synccheck; do
  STAGE_NAME=sanitize run_stage "$tool" 300 "$SAN --tool $tool $PY -m benchmarks.gpu_smoke --device cuda 2>&1 | tail -40"
done

# ---- bench ---------------------------------------------------------------------------------
run_stage bench 600 "$PY benchmarks/run_all.py --device cuda $BENCH_ARGS && cp benchmarks/results/*_cuda*.json '$OUTDIR/' 2>/dev/null; true"

# ---- benchcli: the user-facing command on the GPU --------------------------------------------
run_stage benchcli 300 "$PY -m semcomp_cli bench all --device cuda --dtype bfloat16 -q --json '$OUTDIR/bench_cli_cuda.json' --plot '$OUTDIR/bench_cli_cuda.png'"

[ "$DRY" = 1 ] || { echo "===== summary ====="; cat "$SUMMARY"; }
