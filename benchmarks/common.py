"""Shared helpers of the benchmark scripts; the implementation lives in semcomp_ext.bench."""

from __future__ import annotations

import os
from pathlib import Path

from semcomp_ext.bench.results import write_json
from semcomp_ext.bench.timing import (  # noqa: F401  (re-exported for the scripts)
    cpu_peak_extra_bytes,
    environment,
    median_time,
    prepare_cpu_memory_measurement,
    sync,
)

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict) -> Path:
    """Write payload as JSON to benchmarks/results/<name>, or to `name` if it is a path."""
    return write_json(payload, Path(name) if os.sep in str(name) else RESULTS / name)
