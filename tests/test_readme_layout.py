"""The README's layout map against the repository: every package and folder is named in it,
and every path it names exists."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _map_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Layout\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## Layout' section"
    block = re.search(r"^```\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "the Layout section has no code block"
    return [line.split()[0] for line in block.group(1).splitlines() if line.strip()]


def _tracked_dirs() -> set[str]:
    """Folders that hold a file git tracks (build outputs and caches are not part of the map),
    down to two levels, and every Python package at any depth; hidden folders excluded."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    dirs = set()
    for f in files:
        parts = pathlib.PurePosixPath(f).parts[:-1]
        if not parts or any(p.startswith(".") for p in parts):
            continue
        for depth in range(1, len(parts) + 1):
            d = "/".join(parts[:depth])
            if depth <= 2 or (ROOT / d / "__init__.py").exists():
                dirs.add(d)
    return dirs


def test_every_package_and_folder_is_in_the_layout_map():
    named = {p.rstrip("/") for p in _map_paths() if p.endswith("/")}
    missing = sorted(_tracked_dirs() - named)
    assert not missing, f"README.md's layout map does not name: {missing}"


def test_every_path_in_the_layout_map_exists():
    absent = [p for p in _map_paths() if not (ROOT / p).exists()]
    assert not absent, f"README.md's layout map names paths that do not exist: {absent}"
    assert all(p.endswith("/") == (ROOT / p).is_dir() for p in _map_paths())
