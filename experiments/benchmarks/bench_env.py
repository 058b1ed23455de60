"""What every benchmark records next to its figures: date, machine, torch version, threads and load average."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch


def environment(threads: int | None = None) -> dict:
    """Date, machine, versions, torch threads (default: the current setting) and the 1/5/15-minute load average."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if threads is None else threads,
        "loadavg": list(os.getloadavg()),
    }
