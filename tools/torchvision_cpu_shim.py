"""Make torchvision importable beside a CPU build of torch when only a CUDA torchvision exists.

PyTorch publishes CPU builds of torch and torchvision on its own wheel index; PyPI's Linux
x86-64 torchvision wheels are CUDA builds whose native library (``_C.so``) needs
``libtorch_cuda.so``. Where the CPU index cannot be reached, ``make setup`` ends up with a CPU
torch and a CUDA torchvision, and ``import torchvision`` (hence ``import open_clip``) fails with
``operator torchvision::nms does not exist``: torchvision registers fake kernels for ops that
its unloadable ``_C.so`` should have defined.

Run with the environment's interpreter (``make setup`` does: ``python tools/torchvision_cpu_shim.py``),
this script checks whether ``import torchvision`` works. Only when it fails with exactly that
error does it install a small import hook into the environment's site-packages
(``_semcomp_torchvision_shim.py`` + a ``.pth`` line). The hook acts once, when torchvision is
first imported: if torch is a CPU build and torchvision's ``_C.so`` cannot be loaded, it defines
the two op schemas torchvision registers fakes for (``nms``, ``qnms``), so its pure-Python parts
(transforms, datasets, models) and open_clip import. torchvision's native ops (``nms``,
``roi_align``, video decoding) stay unavailable, as they would without the hook.
It costs nothing at interpreter start (torch is not imported until torchvision is).
Re-running the script removes a hook that is no longer needed (e.g. after a CPU torchvision
was installed). ``--remove`` only removes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

MODULE_NAME = "_semcomp_torchvision_shim"
PTH_NAME = "semcomp_torchvision_shim.pth"
ERROR_TEXT = "torchvision::nms does not exist"

# The hook installed into site-packages. Kept free of imports beyond the standard library at
# interpreter start.
HOOK_SOURCE = '''"""Installed by semcomp_ext's tools/torchvision_cpu_shim.py (see there); remove this file
and semcomp_torchvision_shim.pth to undo. Lets a CUDA torchvision import beside a CPU torch."""
import sys


class _TorchvisionCpuShim:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        try:
            _prepare()
        except Exception:  # never break the import itself; torchvision reports its own error
            pass
        return None  # the ordinary finders import torchvision


def _prepare():
    import glob
    import importlib.machinery
    import os

    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = [p for loc in spec.submodule_search_locations for p in glob.glob(os.path.join(loc, "_C*.so"))]
    import torch

    if torch.version.cuda is not None or not libs:
        return
    try:
        torch.ops.load_library(libs[0])
        return  # a CPU torchvision: its own library defines the ops
    except OSError:
        pass
    global _lib
    _lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


if not any(type(f).__name__ == "_TorchvisionCpuShim" for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionCpuShim())
'''


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def _paths() -> tuple[str, str]:
    site = _site_packages()
    return os.path.join(site, MODULE_NAME + ".py"), os.path.join(site, PTH_NAME)


def remove() -> bool:
    removed = False
    for path in _paths():
        if os.path.exists(path):
            os.remove(path)
            removed = True
    return removed


def _try_import(module: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    had_hook = remove()
    if argv == ["--remove"]:
        print("torchvision shim: removed" if had_hook else "torchvision shim: not installed")
        return 0
    if argv:
        print("usage: python tools/torchvision_cpu_shim.py [--remove]", file=sys.stderr)
        return 2
    probe = _try_import("torchvision")
    if probe.returncode == 0:
        print("torchvision imports natively" + ("; removed the import hook" if had_hook else ""))
        return 0
    if "No module named 'torchvision'" in probe.stderr:
        return 0
    if ERROR_TEXT not in probe.stderr:
        sys.stderr.write(probe.stderr)
        print("torchvision shim: `import torchvision` fails for another reason (above); not handled", file=sys.stderr)
        return 1
    module_path, pth_path = _paths()
    with open(module_path, "w", encoding="utf-8") as f:
        f.write(HOOK_SOURCE)
    with open(pth_path, "w", encoding="utf-8") as f:
        f.write(f"import {MODULE_NAME}\n")
    check = _try_import("torchvision")
    if check.returncode != 0:
        remove()
        sys.stderr.write(check.stderr)
        print("torchvision shim: the import hook did not help; removed it", file=sys.stderr)
        return 1
    print(
        "note: torchvision's native library cannot load beside this CPU torch (a CUDA build of torchvision); "
        f"installed an import hook ({pth_path}) so torchvision and open_clip import "
        "(torchvision's native ops stay unavailable)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
