"""Export packed models to formats serving stacks read: GGUF (llama.cpp) and compressed-tensors
(vLLM). The heavy imports (gguf, safetensors writers) stay inside the submodules."""
from __future__ import annotations

from pathlib import Path

from frugalflow.export.common import ExportError

FORMATS = ("gguf", "compressed-tensors")


def export(fmt: str, model_dir: str | Path, out: str | Path, *, float_type: str = "f16",
           require_exact: bool = False, overwrite: bool = False) -> dict:
    """Write model_dir in one of FORMATS to out (a .gguf file, or a compressed-tensors directory);
    the exporter's summary."""
    if fmt == "gguf":
        from frugalflow.export.gguf import export_gguf

        return export_gguf(model_dir, out, float_type=float_type, require_exact=require_exact, overwrite=overwrite)
    if fmt == "compressed-tensors":
        from frugalflow.export.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(model_dir, out, require_exact=require_exact, overwrite=overwrite)
    raise ExportError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")


__all__ = ["ExportError", "FORMATS", "export"]
