"""benchmarks/machine.py: results name the CPU model, not only the architecture."""
from __future__ import annotations

import platform
import re
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.machine import cpu_model, describe  # noqa: E402

CPUINFO = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n"
           "flags\t\t: fpu avx512f\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n")


def test_cpu_model_is_the_kernels_model_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert cpu_model(info) == "AMD EPYC 9R14 96-Core Processor"


def test_cpu_model_falls_back_to_the_architecture(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")  # arm64 kernels give no model name
    assert cpu_model(info) == platform.machine()
    assert cpu_model(tmp_path / "missing") == platform.machine()


def test_describe_names_model_cores_torch_and_threads():
    import torch
    text = describe()
    assert text.startswith(cpu_model() + ", ")
    assert re.search(rf", \d+ cores, torch {re.escape(torch.__version__)}, {torch.get_num_threads()} threads$", text)


def test_no_benchmark_names_the_machine_by_architecture_alone():
    offenders = [p.name for p in (ROOT / "benchmarks").glob("*.py") if "platform.machine()" in p.read_text()
                 and p.name != "machine.py"]
    assert offenders == []
