"""Export packed models to formats serving stacks read: GGUF (llama.cpp) and compressed-tensors
(vLLM). The heavy imports (gguf, safetensors writers) stay inside the submodules."""
from frugalflow.export.common import ExportError

FORMATS = ("gguf", "compressed-tensors")

__all__ = ["ExportError", "FORMATS"]
