"""One run of ``search_efficiency.py --smoke`` for the benchmark smoke tests: besides its own results, the tiny
digits run it prepares in-process (pretrain, zero-training filter, train) is the base run that
``flora_vs_uniform.py`` and ``latency_front.py`` take through ``--run-dir`` (both only read it), instead of each
preparing the same run again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"


@pytest.fixture(scope="session")
def efficiency(tmp_path_factory):
    """``(out, stdout, result)`` of ``search_efficiency.py --smoke --output out``; its digits run is
    ``out/runs/bench-smoke``."""
    out = tmp_path_factory.mktemp("search-bench")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "search_efficiency.py"), "--smoke", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    assert proc.returncode == 0, f"search_efficiency.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout, json.loads((out / "search_efficiency.json").read_text())
