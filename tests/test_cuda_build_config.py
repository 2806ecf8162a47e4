"""The CUDA build configuration of the sm_90a wgmma kernels (CMakeLists.txt): CMake finds the
CuTe/CUTLASS headers of the pinned nvidia-cutlass package from the building interpreter, builds
the .cu files for sm_80 and sm_90a with them, refuses a compile check without them, and the pin
is the same in the Makefile, constraints.txt and tools/prebuild_gpu.sh.

The configure tests run CMake's configure step only (a few seconds, nothing compiled); they need
cmake, ninja and nvcc (the compile check's requirements) and are skipped without them.
"""
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIN_RE = re.compile(r"nvidia-cutlass==([0-9][0-9.]*)")


def _pins(text):
    return PIN_RE.findall(text)


def _makefile_deps():
    """The Makefile's HEADER_DEPS (installed with --no-deps; the headers are all the build uses)."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"^HEADER_DEPS\s*:=((?:.*\\\n)*.*)$", text, re.M)
    assert m, "Makefile: no HEADER_DEPS line"
    assert re.search(r"pip install -q --no-deps -c constraints.txt \$\(HEADER_DEPS\)", text), \
        "Makefile: HEADER_DEPS is not installed with --no-deps"
    deps = re.search(r"^DEPS\s*:=((?:.*\\\n)*.*)$", text, re.M)
    assert deps and not _pins(deps.group(1)), "Makefile: nvidia-cutlass belongs in HEADER_DEPS, not DEPS"
    return m.group(1)


def test_cutlass_pin_is_the_same_everywhere():
    deps = _pins(_makefile_deps())
    constraints = _pins((ROOT / "constraints.txt").read_text())
    prebuild = _pins((ROOT / "tools" / "prebuild_gpu.sh").read_text())
    assert len(deps) == 1, f"Makefile HEADER_DEPS pins nvidia-cutlass {len(deps)} times: {deps}"
    assert constraints == deps, f"constraints.txt {constraints} != Makefile HEADER_DEPS {deps}"
    assert prebuild and set(prebuild) == set(deps), f"tools/prebuild_gpu.sh {prebuild} != {deps}"
    cmake_hint = _pins((ROOT / "CMakeLists.txt").read_text())
    assert set(cmake_hint) <= set(deps), f"CMakeLists.txt names nvidia-cutlass {cmake_hint}, pinned {deps}"


def test_installed_cutlass_matches_the_pin():
    try:
        have = importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("nvidia-cutlass is not installed in this interpreter")
    assert [have] == _pins(_makefile_deps())


def _cmake():
    # the pip cmake of the interpreter's environment first (what pip install -e . uses)
    for cand in (Path(sys.executable).with_name("cmake"), shutil.which("cmake")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def _ninja():
    for cand in (Path(sys.executable).with_name("ninja"), shutil.which("ninja")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


needs_configure = pytest.mark.skipif(
    not (_cmake() and _ninja() and shutil.which("nvcc") and importlib.util.find_spec("torch")),
    reason="needs cmake, ninja, nvcc and torch (the CUDA compile check's configure step)",
)


def _configure(tmp_path, *extra):
    build = tmp_path / "build"
    cmd = [
        _cmake(), "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={_ninja()}", f"-DPython_EXECUTABLE={sys.executable}",
        "-DSEMCOMP_CUDA=OFF", "-DSEMCOMP_CUDA_CHECK=ON", *extra,
    ]
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    return r, build


def _cuda_units(ninja):
    """{source: {DEFINES, FLAGS, INCLUDES}} of the CUDA compile statements of a build.ninja."""
    units = {}
    for block in ninja.split("\nbuild ")[1:]:
        head, *body = block.splitlines()
        m = re.match(r"\S+\.cu\.o: CUDA_COMPILER\S* (\S+\.cu)", head)
        if not m:
            continue
        v = {"DEFINES": "", "FLAGS": "", "INCLUDES": ""}
        for line in body:
            if not line.startswith("  "):
                break
            key, _, value = line.strip().partition(" = ")
            v[key] = value
        units[m.group(1)] = v
    return units


def _cute_include():
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None:
        return None
    inc = Path(spec.submodule_search_locations[0]) / "source" / "include"
    return inc if (inc / "cute" / "tensor.hpp").exists() else None


@needs_configure
def test_check_build_finds_cute_and_targets_sm80_and_sm90a(tmp_path):
    inc = _cute_include()
    if inc is None:
        pytest.skip("nvidia-cutlass is not installed in this interpreter")
    r, build = _configure(tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"semcomp_ext: CuTe headers at {inc}" in r.stdout
    units = _cuda_units((build / "build.ninja").read_text())
    assert any(src.endswith("csrc/infonce/infonce_wgmma_cuda.cu") for src in units), sorted(units)
    # every .cu of the check target: sm_80 and sm_90a code, the CuTe include, the feature macro
    for src, v in units.items():
        assert "arch=compute_80,code=[compute_80,sm_80]" in v["FLAGS"], src
        assert "arch=compute_90a,code=[compute_90a,sm_90a]" in v["FLAGS"], src
        assert f"-isystem {inc}" in v["INCLUDES"], src
        assert "-DSEMCOMP_HAVE_CUTE=1" in v["DEFINES"].split(), src
        assert '-DSEMCOMP_CUDA_ARCHS=\\"80,90a\\"' in v["DEFINES"].split(), src


@needs_configure
def test_check_build_refuses_without_cute(tmp_path):
    empty = tmp_path / "no_cute"
    empty.mkdir()
    r, _ = _configure(tmp_path, f"-DSEMCOMP_CUTE_INCLUDE={empty}")
    assert r.returncode != 0
    assert "no CuTe headers" in r.stdout
    assert "SEMCOMP_CUDA_CHECK=ON needs the CuTe headers" in r.stderr


@needs_configure
def test_explicit_cute_include_is_used(tmp_path):
    inc = _cute_include()
    if inc is None:
        pytest.skip("nvidia-cutlass is not installed in this interpreter")
    # a copy-free stand-in: a folder whose cute/ and cutlass/ are links to the package's
    alt = tmp_path / "alt_include"
    alt.mkdir()
    (alt / "cute").symlink_to(inc / "cute")
    (alt / "cutlass").symlink_to(inc / "cutlass")
    r, build = _configure(tmp_path, f"-DSEMCOMP_CUTE_INCLUDE={alt}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"semcomp_ext: CuTe headers at {alt}" in r.stdout
    units = _cuda_units((build / "build.ninja").read_text())
    assert units and all(f"-isystem {alt}" in v["INCLUDES"] for v in units.values())
