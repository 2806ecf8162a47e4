"""Importing optional peers (open_clip) robustly, for the project's own code.

User code needs none of this: in an environment made by ``make setup`` (or with a torchvision
that matches torch) ``import open_clip`` works as it is. This stays as a fallback for
environments made otherwise: a torchvision wheel built for CUDA cannot load its native library
under a CPU build of torch, and its Python fallback then fails with
``operator torchvision::nms does not exist``. Defining the two op schemas it registers fakes
for lets the pure-Python parts (transforms, open_clip) import. Only that exact failure is
handled; everything else re-raises. ``make setup`` installs the same fix as an import hook
(tools/torchvision_cpu_shim.py) when, and only when, the environment needs it.
"""

from __future__ import annotations

import importlib
import sys

import torch

_shim_lib = None


def _define_torchvision_schemas() -> None:
    global _shim_lib
    if _shim_lib is None:
        _shim_lib = torch.library.Library("torchvision", "FRAGMENT")
        _shim_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _shim_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def import_open_clip():
    """Import and return the open_clip module (ImportError if it is not installed)."""
    try:
        return importlib.import_module("open_clip")
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith(("torchvision.", "open_clip"))]:
        del sys.modules[name]
    _define_torchvision_schemas()
    return importlib.import_module("open_clip")
