"""The environment `make setup` builds: user code imports open_clip and semcomp_ext directly.

Each check runs in a fresh interpreter of this environment (sys.executable), so nothing
imported by the test process (or by the project's own import fallback in semcomp_ext._compat)
can hide a failure.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=180)


def test_open_clip_and_semcomp_ext_import_together():
    # Plain `import open_clip` first (nothing of the project loaded), then the parts that run
    # through torchvision (image transforms, tokenizer), then semcomp_ext beside it.
    proc = _python(
        "import open_clip, sys\n"
        "assert 'semcomp_ext' not in sys.modules\n"
        "from PIL import Image\n"
        "x = open_clip.image_transform(64, is_train=True)(Image.new('RGB', (40, 30)))\n"
        "assert tuple(x.shape) == (3, 64, 64), x.shape\n"
        "assert open_clip.get_tokenizer('ViT-B-32')(['a cat']).shape == (1, 77)\n"
        "import semcomp_ext, torchvision\n"
        "print(open_clip.__version__, semcomp_ext.__version__, torchvision.__version__)\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    oc_version, sc_version, tv_version = proc.stdout.split()
    assert (oc_version, sc_version) == ("3.3.0", "0.1.0")
    assert tv_version.split("+")[0] == _pins()["torchvision"]


def _pins() -> dict:
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==")
                pins[name.strip()] = version.strip()
    return pins


def test_torch_and_torchvision_pins_agree():
    import torch

    pins = _pins()
    # torchvision 0.28 is the release made for torch 2.13.
    assert pins["torch"] == "2.13.0+cpu" and pins["torchvision"] == "0.28.0"
    assert torch.__version__ == pins["torch"]


def _load_shim_tool():
    spec = importlib.util.spec_from_file_location("torchvision_cpu_shim", os.path.join(ROOT, "tools", "torchvision_cpu_shim.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bare_import():
    # Under -S no .pth file runs (neither the installed hook nor the editable install), so this
    # sees the bare environment.
    site = sysconfig.get_paths()["purelib"]
    return site, _python(f"import sys; sys.path.append({site!r})\nimport torchvision", "-S")


def test_torchvision_shim_hook_makes_cuda_torchvision_importable(bare_import):
    # `import torchvision` either works (a CPU torchvision) or fails with the mismatch the hook
    # exists for; with the hook's source run first it must work.
    tool = _load_shim_tool()
    site, bare = bare_import
    assert bare.returncode == 0 or tool.ERROR_TEXT in bare.stderr, bare.stderr[-2000:]
    hooked = _python(f"import sys; sys.path.append({site!r})\nexec({tool.HOOK_SOURCE!r})\n"
                     "import torchvision.transforms as T\nprint(T.Resize(8))", "-S")
    assert hooked.returncode == 0, hooked.stderr[-2000:]


def test_torchvision_shim_installed_only_when_needed(bare_import):
    # `make setup` ran the tool: the hook is in site-packages exactly when the bare import fails.
    tool = _load_shim_tool()
    site, bare = bare_import
    installed = os.path.exists(os.path.join(site, tool.PTH_NAME))
    assert installed == (bare.returncode != 0), (installed, bare.stderr[-500:])
