#!/usr/bin/env bash
# Builds the CUDA extension (semcomp_ext._C) on a machine WITHOUT a GPU for the GPU image
# (python 3.12, torch 2.11.0+cu130, sm_90a), so that a GPU window spends no time compiling.
#
#   tools/prebuild_gpu.sh            # build (or reuse) .gpu-build/prebuilt/
#   tools/prebuild_gpu.sh --hash     # print the source hash a prebuilt module is stamped with
#   tools/prebuild_gpu.sh --check    # exit 0 iff .gpu-build/prebuilt matches the sources
#
# Steps: a Python 3.12 interpreter (pyenv, or SEMCOMP_PY312), a venv in .gpu-build/venv with
# torch==2.11.0 from the package index installed WITHOUT its dependencies (the build needs
# torch's headers and link libraries only; the CUDA runtime headers and libcudart come from the
# local nvcc 13.0 toolkit) and nvidia-cutlass (the CuTe headers of the wgmma kernels, also
# without dependencies), then CMake with SEMCOMP_CUDA=ON for sm_90a, parallel nvcc.
# The module and a stamp (source hash, python, torch, arch) land in .gpu-build/prebuilt/
# with the CuTe/CUTLASS headers packed (cute-include.tar.gz, for a source build there)
# (git-ignored, about 15 MiB): carry `.gpu-build/prebuilt` to the GPU machine, where
# benchmarks/gpu_check.sh uses it when the stamp matches the tree there and
# benchmarks/native_error_check passes with it, and builds from source otherwise.
#
# Environment: SEMCOMP_GPU_BUILD (work folder, default .gpu-build), SEMCOMP_PREBUILD_ARCH
# (default 90a), SEMCOMP_TORCH_SPEC (default torch==2.11.0), SEMCOMP_CUTLASS_SPEC (default
# nvidia-cutlass==4.2.0.0), SEMCOMP_PY312 (interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# The hash of everything the module is compiled from (sorted paths and contents); the same
# command runs on the GPU machine, where the tree may have no .git.
source_hash() {
  find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | cat - CMakeLists.txt | sha256sum | cut -c1-16
}

case "${1:-}" in
  --hash) source_hash; exit 0 ;;
  --check)
    stamp=.gpu-build/prebuilt/stamp.txt
    [ -f "$stamp" ] && grep -qx "source=$(source_hash)" "$stamp" && ls .gpu-build/prebuilt/_C.*.so >/dev/null 2>&1
    exit $? ;;
  "") ;;
  *) echo "prebuild_gpu.sh: unknown option $1" >&2; exit 2 ;;
esac

GB="${SEMCOMP_GPU_BUILD:-$ROOT/.gpu-build}"
ARCH="${SEMCOMP_PREBUILD_ARCH:-90a}"
TORCH_SPEC="${SEMCOMP_TORCH_SPEC:-torch==2.11.0}"
mkdir -p "$GB"
t_start=$SECONDS

# ---- 1. Python 3.12 -------------------------------------------------------------------------
PY312="${SEMCOMP_PY312:-}"
if [ -z "$PY312" ] && command -v pyenv >/dev/null 2>&1; then
  v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -1 || true)
  [ -n "$v" ] && PY312="$(pyenv root)/versions/$v/bin/python3.12"
fi
[ -z "$PY312" ] && PY312=$(command -v python3.12 || true)
if [ -z "$PY312" ] || ! "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  echo "prebuild_gpu.sh: no Python 3.12 found (pyenv, python3.12 or SEMCOMP_PY312)" >&2
  exit 1
fi

# ---- 2. venv with torch (headers and libraries; no CUDA wheels needed to compile) -----------
VENV="$GB/venv"
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
# torch/version.py is read, not imported: without its CUDA wheels this torch cannot be imported
torch_info() {
  "$VENV/bin/python" -c "import importlib.util, os; d = importlib.util.find_spec('torch').submodule_search_locations[0]; v = {}; exec(open(os.path.join(d, 'version.py')).read(), v); print(v['__version__'], v['cuda'])" 2>/dev/null
}
if ! torch_info >/dev/null; then
  echo "== installing $TORCH_SPEC (no dependencies) into $VENV"
  "$VENV/bin/python" -m pip install -q --no-deps --only-binary=:all: "$TORCH_SPEC"
fi
# the CuTe/CUTLASS headers (header-only): without them the module's wgmma kernels are stubs
CUTLASS_SPEC="${SEMCOMP_CUTLASS_SPEC:-nvidia-cutlass==4.2.0.0}"
cutlass_version() {
  "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('nvidia-cutlass'))" 2>/dev/null
}
if [ "$(cutlass_version)" != "${CUTLASS_SPEC#*==}" ]; then
  echo "== installing $CUTLASS_SPEC (no dependencies) into $VENV"
  "$VENV/bin/python" -m pip install -q --no-deps --only-binary=:all: "$CUTLASS_SPEC"
fi
TORCH_INFO=$(torch_info)
echo "== torch $TORCH_INFO (python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'))"
case "$TORCH_INFO" in
  *" None") echo "prebuild_gpu.sh: this torch has no CUDA; set SEMCOMP_TORCH_SPEC" >&2; exit 1 ;;
esac

# ---- 3. CMake + nvcc ------------------------------------------------------------------------
BUILD="$GB/cmake-$ARCH"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
HASH=$(source_hash)
command -v nvcc >/dev/null || { echo "prebuild_gpu.sh: nvcc not found" >&2; exit 1; }
# cmake builds two nvcc units at a time on 2 cores; more only when the machine has them
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# torch's CUDA headers need nvcc to know the torch build's standard and ABI (C++17 for 2.11)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$VENV/bin/python" -DSEMCOMP_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" \
  -DCMAKE_CXX_COMPILER="${SEMCOMP_CXX:-/usr/bin/g++}" -DCMAKE_CUDA_HOST_COMPILER="${SEMCOMP_CXX:-/usr/bin/g++}" \
  -DSKBUILD_PROJECT_VERSION="$VERSION" >"$GB/cmake-configure.log" 2>&1 ||
  { tail -30 "$GB/cmake-configure.log" >&2; exit 1; }
if ! grep -q "semcomp_ext: CuTe headers at" "$GB/cmake-configure.log"; then
  grep "CuTe" "$GB/cmake-configure.log" >&2 || true
  echo "prebuild_gpu.sh: CMake found no CuTe headers; the wgmma kernels would be stubs" >&2
  exit 1
fi
t_build=$SECONDS
rm -f "$BUILD"/_C.*.so  # a failed build must not leave the previous module to be stamped
if ! cmake --build "$BUILD" -j "$JOBS" >"$GB/cmake-build.log" 2>&1; then
  grep -E -m 20 'error' "$GB/cmake-build.log" >&2
  echo "prebuild_gpu.sh: build failed (see $GB/cmake-build.log)" >&2
  exit 1
fi
grep -E '^\[' "$GB/cmake-build.log" | tail -3 || true
SO=$(ls "$BUILD"/_C.*.so | head -1)
# a shared module links even with a missing definition (it would fail at import on the GPU)
missing=$(nm -D --undefined-only "$SO" | c++filt | grep -E 'semcomp::' || true)
if [ -n "$missing" ]; then
  echo "prebuild_gpu.sh: the module leaves project symbols undefined (re-run to re-glob csrc):" >&2
  echo "$missing" >&2
  exit 1
fi
if [ "$(source_hash)" != "$HASH" ]; then
  echo "prebuild_gpu.sh: csrc changed during the build; run it again" >&2
  exit 1
fi

# ---- 4. the carried folder ------------------------------------------------------------------
OUTD="$GB/prebuilt"
rm -rf "$OUTD.tmp" && mkdir -p "$OUTD.tmp"
cp "$SO" "$OUTD.tmp/"
strip --strip-unneeded "$OUTD.tmp/$(basename "$SO")" 2>/dev/null || true
# the CuTe/CUTLASS headers too (a few MiB packed): the GPU machine has no network, and a source
# build there (a stale module) needs them for the wgmma kernels
CUTE_INC=$("$VENV/bin/python" -c "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source', 'include'))")
tar -czf "$OUTD.tmp/cute-include.tar.gz" -C "$CUTE_INC" cute cutlass
{
  echo "source=$HASH"
  echo "python=3.12"
  echo "torch=$(echo "$TORCH_INFO" | cut -d' ' -f1)"
  echo "cuda=$(echo "$TORCH_INFO" | cut -d' ' -f2)"
  echo "arch=$ARCH"
  echo "cutlass=$(cutlass_version)"
  echo "nvcc=$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$OUTD.tmp/stamp.txt"
rm -rf "$OUTD" && mv "$OUTD.tmp" "$OUTD"
size=$(du -sm "$OUTD" | cut -f1)
echo "== prebuilt: $OUTD ($size MiB; compile $((SECONDS - t_build)) s, total $((SECONDS - t_start)) s)"
cat "$OUTD/stamp.txt"
if [ "$size" -gt 60 ]; then
  echo "prebuild_gpu.sh: $size MiB is too large to carry (limit 64 MiB with the tree)" >&2
  exit 1
fi
