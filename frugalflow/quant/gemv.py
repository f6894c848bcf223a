"""The few-row packed-weight kernel (gemv.cpp), compiled for this machine's CPU on first use.

Decode multiplies one row of activations by every weight; torch's int4/int8 CPU kernels do that
well below the memory bandwidth a dense float GEMV reaches. gemv.cpp reads pack.py's packed codes,
scales and zeros as stored (no converted copy), sums in float32 and writes x's dtype, and one call
serves several weights that read the same input (fused.py). It is built with torch's C++ extension
loader (a C++ compiler and ninja; -O3 -march=native) into torch's extension cache, once per source
and CPU. Without a compiler, or with FRUGALFLOW_GEMV=0, `packed_gemv` is None and QuantLinear uses
torch's kernels: same results to bf16 rounding, slower decode.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv.cpp")
MAX_ROWS = 8  # gemv.cpp's kMaxRows: longer inputs (prefill, evaluation) go to torch's kernels
BITS = (4, 8)
DTYPES = (torch.float32, torch.bfloat16)
log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def _build_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu += next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    digest = hashlib.sha1(SOURCE.read_bytes() + cpu.encode() + torch.__version__.encode()).hexdigest()[:12]
    return f"frugalflow_gemv_{digest}"


def _build():
    from torch.utils import cpp_extension

    try:
        import ninja  # the pip package: put its binary where torch's loader looks

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    return cpp_extension.load(_build_name(), [str(SOURCE)], extra_cflags=["-O3", "-march=native"], verbose=False)


def kernels():
    """The compiled module, or None (disabled by FRUGALFLOW_GEMV=0, or the build failed: logged once)."""
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                module = None
                if os.environ.get("FRUGALFLOW_GEMV", "1") != "0":
                    try:
                        module = _build()
                    except Exception as e:  # no compiler, no ninja, a read-only cache: torch's kernels instead
                        log.warning("frugalflow: the one-row packed kernel was not built (%s: %s); decode uses "
                                    "torch's int4/int8 kernels", type(e).__name__, str(e).splitlines()[0][:200])
                _state["module"] = module
    return _state["module"]


def fits(bits: int, group: int, in_features: int) -> bool:
    """Whether gemv.cpp takes a weight of this grid (group: the group size, in_features if per row)."""
    return bits in BITS and in_features % group == 0 and group % (32 if bits == 4 else 16) == 0


def takes(x2: torch.Tensor) -> bool:
    """Whether an input [rows, in] is one for the kernel: few rows, float32/bfloat16 on the CPU, no autograd."""
    return x2.shape[0] <= MAX_ROWS and x2.device.type == "cpu" and x2.dtype in DTYPES and not x2.requires_grad


def packed_gemv(x2: torch.Tensor, qweights: list, scales: list, zeros: list, bits: int, group: int) -> torch.Tensor:
    """x2 [rows <= MAX_ROWS, in] (float32 or bfloat16, contiguous) times each packed weight, the outputs
    side by side in x2's dtype. Call only where `kernels()` is not None."""
    return _state["module"].packed_gemv(x2, qweights, scales, zeros, bits, group)
