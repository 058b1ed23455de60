"""What every benchmark script shares: its arguments, its smoke mode, the environment it records and its JSON file.

A script builds its parser with ``bench_parser`` (``--smoke`` and ``--output`` already there), adds its own options
and the smaller values ``--smoke`` gives them, records ``environment()`` next to its figures and writes them with
``write_result``, which attaches ``provenance()`` and writes atomically::

    parser = bench_parser(__doc__, smoke={"trials": 6})
    parser.add_argument("--trials", type=int, default=60)
    args = parser.parse_args()          # args.output: --output, else results/ (runs/bench-smoke/ with --smoke)
    ...
    write_result(args.output / "name.json", {"smoke": args.smoke, "rows": rows, **environment()})

Shared run preparation lives in ``harness_runs.py`` and shared model workloads and step timing in
``harness_workloads.py``; no benchmark imports another benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flora_ray.core.subnet import package_versions
from flora_ray.storage.files import write_json

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_OUTPUT = ROOT / "runs" / "bench-smoke"  # where a smoke run writes without --output: results/ stays the full runs'


class BenchParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with ``--smoke`` and ``--output`` whose ``--smoke`` swaps in smaller defaults.

    The smoke values replace the defaults of the options they name (or set attributes no option has); an option
    given on the command line still wins. ``parse_args`` resolves ``output`` to a directory: ``--output``, else
    ``RESULTS`` for a full run and ``SMOKE_OUTPUT`` for a smoke run.
    """

    def __init__(self, description: str, *, smoke: Mapping[str, Any] | None = None, smoke_help: str = "") -> None:
        super().__init__(description=description)
        self.smoke_defaults = dict(smoke or {})
        self.add_argument("--smoke", action="store_true", help=smoke_help or "small inputs, seconds")
        self.add_argument(
            "--output",
            type=Path,
            help=f"directory for the results (default: results/; with --smoke {SMOKE_OUTPUT.relative_to(ROOT)}/)",
        )

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        known, _ = self.parse_known_args(args)
        if known.smoke:
            self.set_defaults(**self.smoke_defaults)
        parsed = super().parse_args(args, namespace)
        if parsed.output is None:
            parsed.output = SMOKE_OUTPUT if parsed.smoke else RESULTS
        return parsed


def bench_parser(doc: str, *, smoke: Mapping[str, Any] | None = None, smoke_help: str = "") -> BenchParser:
    """The parser of a benchmark script: its docstring's first line as description, ``--smoke`` (``smoke``: the
    option values it implies, ``smoke_help``: what it runs) and ``--output``."""
    return BenchParser(doc.strip().splitlines()[0], smoke=smoke, smoke_help=smoke_help)


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


def environment(threads: int | None = None) -> dict[str, Any]:
    """Date, machine, torch version, torch threads (default: the current setting) and the 1/5/15-minute load
    average: the keys every result records beside its figures."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{_cpu_name() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if threads is None else threads,
        "loadavg": list(os.getloadavg()),
    }


def git_commit(root: Path = ROOT) -> dict[str, Any] | None:
    """The checkout's commit and whether it has uncommitted changes (``None``: not a git checkout, or no git)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where a result came from: when it was written (UTC), the command line, the git commit, package versions,
    the machine, torch threads and the load average at writing."""
    return {
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *(sys.argv if argv is None else argv)],
        "git": git_commit(),
        "versions": package_versions(),
        "machine": environment()["machine"],
        "threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
    }


def write_result(path: Path, result: Mapping[str, Any]) -> Path:
    """Write ``result`` with this writing's ``provenance`` to ``path`` as JSON, atomically (a temporary file renamed
    into place); returns ``path``. A ``provenance`` that ``result`` carries (a result read back, amended and written
    again) is replaced: the file records its last writing."""
    write_json(path, {**{k: v for k, v in result.items() if k != "provenance"}, "provenance": provenance()})
    return path
