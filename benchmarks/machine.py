"""The machine a benchmark ran on, as its results name it: CPU model, cores, torch, threads."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as the kernel reports it (two x86_64 hosts can differ 2x in decode
    speed), or the architecture where the kernel does not say."""
    try:
        line = next(x for x in cpuinfo.read_text().splitlines() if x.startswith("model name"))
        return line.split(":", 1)[1].strip() or platform.machine()
    except (OSError, StopIteration):
        return platform.machine()


def describe() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
