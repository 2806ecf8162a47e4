#!/usr/bin/env bash
# One call on a GPU machine that turns a short GPU window into verdicts. Default mode runs
# in priority order, each stage time-boxed, within SEMCOMP_WINDOW_S (480 s, so that a
# rerun fits a 15-minute window with the machine's start):
#   P0  env       device, driver, torch/CUDA, measured bf16 matmul and copy ceilings
#       build     the prebuilt module (.gpu-build/prebuilt, tools/prebuild_gpu.sh) when its
#                 stamp matches this tree, python and torch and it passes native_error_check;
#                 otherwise the source build (SEMCOMP_CUDA=ON, this GPU's arch only)
#       native    native_error_check --cuda on the module in use (errors raise, CUDA kernels run)
#       tests     every CUDA-parametrised kernel test (no torch.compile tests)
#       timing    InfoNCE forward+backward per implementation that runs here (gemm, tile, mma,
#                 wgmma; 32768x512 and 65536x768 bf16, 32768x512 fp16) and SigLIP per
#                 implementation (gemm, mma) at 32768x512 bf16 -> timing.json
#       kernels   the wgmma kernels (which no emulator runs) against mma and fp64
#                 (benchmarks/wgmma_check.py -> wgmma_check.json; "cannot run here" is rc 0)
#   P1  memcheck, racecheck   compute-sanitizer over gpu_smoke's groups that never ran on a GPU
#   P2  (only while the window has room for the stage's whole budget)
#       synccheck, compile (the reduce-overhead test), benchcli (`semcomp bench all`)
# --full runs the rest in a second call: every sanitizer over every group, the compile tests,
# the full benchmark sweep with peers and Inf-CL, benchcli (no window).
# Each stage appends "name rc seconds" to OUTDIR/summary.txt as it ends; the full log is
# OUTDIR/gpu_check.log; JSON results land in OUTDIR as they are written, so a call cut off
# at its limit still returns what finished.
#
#   benchmarks/gpu_check.sh [OUTDIR] [--full] [--stages "build tests ..."] [--budget NAME=S]... [--dry-run]
#
# --budget NAME=S replaces a stage's time box (seconds), e.g. more for the tests in a rerun.
# --dry-run prints the plan (priority, budget, command) and fails when the P0 + P1 budgets
# exceed 480 s (CI runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUTDIR="${OUT:-gpu_out}"
MODE=window
DRY=0
ONLY=""
BENCH_ARGS="${SEMCOMP_BENCH_ARGS:-}"
WINDOW_S="${SEMCOMP_WINDOW_S:-480}"
P01_LIMIT_S=480
declare -A OVERRIDE=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --full) MODE=full ;;
    --stages) ONLY="$2"; shift ;;
    --bench-args) BENCH_ARGS="$2"; shift ;;
    --budget)
      case "${2:-}" in
        *=*) OVERRIDE["${2%%=*}"]="${2#*=}" ;;
        *) echo "gpu_check.sh: --budget takes NAME=SECONDS, got '${2:-}'" >&2; exit 2 ;;
      esac
      case "${2#*=}" in ''|*[!0-9]*) echo "gpu_check.sh: --budget ${2%%=*}: seconds must be a whole number, got '${2#*=}'" >&2; exit 2 ;; esac
      shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) OUTDIR="$1" ;;
  esac
  shift
done
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG="$OUTDIR/gpu_check.log"
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
export PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# the prebuilt module is copied into semcomp_ext/: the tree itself must be importable
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The GPU machine's copy of the tree may have no .git: benchmarks read the commit from here.
export SEMCOMP_GIT_COMMIT="${SEMCOMP_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || cat .gpu_commit 2>/dev/null || echo unknown)}"

# ---- compiler: the GCC torch was built with, libstdc++ linked dynamically. The GPU image sets
# CC/CXX to a /opt/gcc wrapper that links libstdc++ statically: the extension then carries its
# own copy of the iostream code, and formatting any TORCH_CHECK message crashed the process.
if [ -x /usr/bin/g++ ]; then
  export CXX="${SEMCOMP_CXX:-/usr/bin/g++}" CC="${SEMCOMP_CC:-/usr/bin/gcc}"
  export CUDAHOSTCXX="$CXX"
fi

# ---- the module: prebuilt when it matches, else built from source --------------------------
prebuilt_usable() {  # prints why not, returns 1, when the carried module cannot be used here
  local stamp=.gpu-build/prebuilt/stamp.txt
  [ -f "$stamp" ] || { echo "no prebuilt module (.gpu-build/prebuilt not carried)"; return 1; }
  bash tools/prebuild_gpu.sh --check || { echo "prebuilt module is stale: built from other sources"; return 1; }
  local want have
  want="$(sed -n 's/^python=//p' "$stamp") $(sed -n 's/^torch=//p' "$stamp") $(sed -n 's/^arch=//p' "$stamp")"
  have=$($PY -c 'import platform, torch; c = torch.cuda.get_device_capability(); print(".".join(platform.python_version_tuple()[:2]), torch.__version__, f"{c[0]}{c[1]}a" if c[0] == 9 else f"{c[0]}{c[1]}")' 2>&1)
  [ "$want" = "$have" ] || { echo "prebuilt module is for '$want', this machine has '$have'"; return 1; }
}
build_from_source() {
  local arch cute=""
  # sm_90a on an H100/H200: the wgmma kernels exist only there (plain sm_90 builds them as traps)
  arch="${SEMCOMP_CUDA_ARCH:-$($PY -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}a" if p == (9, 0) else f"{p[0]}{p[1]}")' 2>/dev/null || echo 90a)}"
  # the CuTe headers: nvidia-cutlass when installed here, else the copy carried with the prebuilt
  # module (no network on the GPU machine); without either the wgmma kernels are stubs
  if ! $PY -c 'import cutlass_library' 2>/dev/null && [ -f .gpu-build/prebuilt/cute-include.tar.gz ]; then
    mkdir -p /tmp/semcomp_cute && tar -xzf .gpu-build/prebuilt/cute-include.tar.gz -C /tmp/semcomp_cute &&
      cute=" -DSEMCOMP_CUTE_INCLUDE=/tmp/semcomp_cute"
  fi
  rm -f semcomp_ext/_C.*.so
  echo "building from source for sm_$arch ($(nproc) jobs)${cute:+, CuTe headers from the prebuilt folder}"
  SEMCOMP_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$arch$cute" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    $PY -m pip install -q --no-build-isolation --no-deps -e .
}
stage_build() {
  local why
  if why=$(prebuilt_usable); then
    cp .gpu-build/prebuilt/_C.*.so semcomp_ext/
    echo "prebuilt module: $(tr '\n' ' ' <.gpu-build/prebuilt/stamp.txt)"
    if $PY -m benchmarks.native_error_check --cuda; then return 0; fi
    echo "the prebuilt module failed native_error_check: building from source"
  else
    echo "$why: building from source"
  fi
  build_from_source
}
export -f prebuilt_usable build_from_source stage_build

# ---- the plan ----------------------------------------------------------------------------------
# Test selection: the CUDA parametrisations of every kernel test file, without the
# torch.compile tests (those run in P2 / --full).
KERNEL_TESTS="tests/test_infonce.py tests/test_segment_gather.py tests/test_pair_mean.py tests/test_siglip.py tests/test_cuda.py tests/test_cuda_chunking.py tests/test_cuda_impl_choice.py tests/test_loss_api_contracts.py tests/test_clip_loss.py tests/test_distributed.py tests/test_compress_device.py"
PYTEST="\$PY -m pytest -q -p no:cacheprovider -o addopts='-ra'"
# the kernel tests spread over 4 processes when pytest-xdist is there (the GPU image has it)
XDIST="\$(\$PY -c 'import xdist' 2>/dev/null && echo '-n 4')"
# gpu_smoke groups never run on a GPU before (the gemm path, segment and gather were sanitized)
NEW_GROUPS="infonce_gemm infonce_tile infonce_mma infonce_wgmma sigmoid sigmoid_mma sigmoid_wgmma pair_mean"
SAN="compute-sanitizer --error-exitcode 9 --kernel-name kns=semcomp --print-limit 20"
# exit 2: wgmma cannot run here (no sm_90a/CuTe build, another device): recorded, not a failure
WGMMA_CHECK="\$PY -m benchmarks.wgmma_check '$OUTDIR' --no-timing; rc=\$?; [ \$rc = 2 ] && rc=0; exit \$rc"

NAMES=(); PRIOS=(); BUDGETS=(); CMDS=()
stage() { NAMES+=("$1"); PRIOS+=("$2"); BUDGETS+=("${OVERRIDE[$1]:-$3}"); CMDS+=("$4"); }

if [ "$MODE" = window ]; then
  stage env P0 20 "nvidia-smi -L; \$PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)'; \$PY -m benchmarks.gpu_ceilings --out '$OUTDIR/ceilings.json'"
  stage build P0 120 "stage_build"
  stage native P0 20 "\$PY -m benchmarks.native_error_check --cuda"
  stage tests P0 120 "$PYTEST $XDIST $KERNEL_TESTS -k 'cuda and not compile'"
  stage timing P0 55 "\$PY -m benchmarks.gpu_timing --out '$OUTDIR/timing.json'"
  stage kernels P0 40 "$WGMMA_CHECK"
  stage memcheck P1 45 "$SAN --tool memcheck \$PY -m benchmarks.gpu_smoke --device cuda --only $NEW_GROUPS"
  stage racecheck P1 60 "$SAN --tool racecheck \$PY -m benchmarks.gpu_smoke --device cuda --only $NEW_GROUPS"
  stage synccheck P2 45 "$SAN --tool synccheck \$PY -m benchmarks.gpu_smoke --device cuda --only $NEW_GROUPS"
  stage compile P2 60 "$PYTEST tests/test_cuda.py -k compile_reduce_overhead"
  stage benchcli P2 90 "\$PY -m semcomp_cli bench all --device cuda --dtype bfloat16 -q -o '$OUTDIR/bench_cli_cuda.json' --plot '$OUTDIR/bench_cli_cuda.png'"
else
  stage env P0 30 "nvidia-smi; nvcc --version | tail -2; \$PY -m benchmarks.gpu_ceilings --out '$OUTDIR/ceilings.json'"
  stage build P0 300 "stage_build"
  stage native P0 20 "\$PY -m benchmarks.native_error_check --cuda"
  if ls .whl/*.whl >/dev/null 2>&1; then  # peers and their dependencies, carried (no network there)
    stage wheels P0 120 "\$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/semcomp_site .whl/*.whl"
    export PYTHONPATH="/tmp/semcomp_site:$PYTHONPATH"
  fi
  stage compile P0 240 "$PYTEST $KERNEL_TESTS -k 'compile'"
  stage kernels P0 120 "\$PY -m benchmarks.wgmma_check '$OUTDIR'; rc=\$?; [ \$rc = 2 ] && rc=0; exit \$rc"
  # the workspace at the largest batch the issue names (one timed round per implementation)
  stage memory P0 150 "\$PY -m benchmarks.gpu_timing --shapes 262144x512:bfloat16 --siglip 262144x512:bfloat16 --rounds 1 --warmup 1 --sets 1 --out '$OUTDIR/timing_262144.json'"
  for tool in memcheck racecheck synccheck; do
    stage "$tool" P1 240 "$SAN --tool $tool \$PY -m benchmarks.gpu_smoke --device cuda"
  done
  stage bench P2 600 "\$PY -m benchmarks.run_all --device cuda $BENCH_ARGS; rc=\$?; tar -czf '$OUTDIR/results_cuda.tar.gz' -C benchmarks results; exit \$rc"
  stage benchcli P2 300 "\$PY -m semcomp_cli bench all --device cuda --dtype bfloat16 -q -o '$OUTDIR/bench_cli_cuda.json' --plot '$OUTDIR/bench_cli_cuda.png'"
fi

selected() { [ -z "$ONLY" ] || case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if [ "$DRY" = 1 ]; then
  p01=0; all=0
  echo "gpu_check plan ($MODE mode, window ${WINDOW_S}s):"
  for i in "${!NAMES[@]}"; do
    selected "${NAMES[$i]}" || continue
    printf '[dry-run] %-3s %-10s %4ss: %s\n' "${PRIOS[$i]}" "${NAMES[$i]}" "${BUDGETS[$i]}" "${CMDS[$i]}"
    echo "${NAMES[$i]} dry-run" >>"$SUMMARY"
    all=$((all + BUDGETS[i]))
    case "${PRIOS[$i]}" in P0|P1) p01=$((p01 + BUDGETS[i])) ;; esac
  done
  echo "budget: P0+P1 ${p01}s, all stages ${all}s"
  if [ "$MODE" = window ] && [ "$p01" -gt "$P01_LIMIT_S" ]; then
    echo "gpu_check.sh: the P0+P1 budgets sum to ${p01}s > ${P01_LIMIT_S}s: the window does not fit" >&2
    exit 1
  fi
  exit 0
fi

# ---- run ---------------------------------------------------------------------------------------
T0=$SECONDS
NO_MODULE=0
for i in "${!NAMES[@]}"; do
  name="${NAMES[$i]}" prio="${PRIOS[$i]}" budget="${BUDGETS[$i]}" cmd="${CMDS[$i]}"
  selected "$name" || continue
  used=$((SECONDS - T0))
  if [ "$MODE" = window ] && [ "$prio" = P2 ] && [ $((used + budget)) -gt "$WINDOW_S" ]; then
    echo "$name skipped: no room (${used}s used, needs ${budget}s of ${WINDOW_S}s)" | tee -a "$SUMMARY" "$LOG"
    continue
  fi
  if [ "$NO_MODULE" = 1 ] && [ "$name" != env ]; then
    echo "$name skipped: no working module" | tee -a "$SUMMARY" "$LOG"
    continue
  fi
  t0=$SECONDS
  echo "===== $prio $name (${budget}s): $cmd =====" | tee -a "$LOG"
  timeout --kill-after=10 "$budget" bash -c "set -o pipefail; $cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && note=" (time box)" || note=""
  echo "$name rc=$rc $((SECONDS - t0))s$note" | tee -a "$SUMMARY" "$LOG"
  case "$name" in build|native) [ "$rc" = 0 ] || NO_MODULE=1 ;; esac
done
echo "total $((SECONDS - T0))s" | tee -a "$SUMMARY" "$LOG"
echo "===== summary ====="
cat "$SUMMARY"
