import pytest
import torch

import semcomp_ext  # noqa: F401  (registers the ops)
from semcomp_ext._ops import has_kernel


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available() and has_kernel("infonce_fwd", "cuda"):
        devs.append("cuda")
    return devs


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def open_clip_module():
    from semcomp_ext._compat import import_open_clip

    return import_open_clip()
