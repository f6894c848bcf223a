"""Shared by the exporters: load a model directory, check that it is a Llama-family model the
serving formats describe, read each compressible linear's grid, and write files atomically.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from frugalflow.arch import compressible_linears
from frugalflow.models import load_model
from frugalflow.quant.runtime import PackedLinear, TiedEmbedding, dequantize_all, module_name


class ExportError(ValueError):
    """A model (or a request) an exporter cannot honour; the message says why."""


def load_for_export(model_dir: str | Path, keep_tied_head: Callable[[PackedLinear], bool] = lambda head: False
                    ) -> nn.Module:
    """The model in model_dir (dense or packed), fp32 activations, checked for export. A packed output
    head tied to the input embedding is dequantized (a dense table and head) unless keep_tied_head(head)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: model directory does not exist")
    model = load_model(model_dir)  # ModelLoadError (a ValueError) names the problem
    check_llama(model.config)
    embedding = model.get_input_embeddings()
    if isinstance(embedding, TiedEmbedding) and not keep_tied_head(embedding.head):
        dequantize_all(model, only={module_name(model, embedding.head)})
    return model


def check_llama(config) -> None:
    """Llama-family layout (SmolLM, TinyLlama, Llama 2): what both exporters describe."""
    if getattr(config, "model_type", None) != "llama":
        raise ExportError(f"model_type {getattr(config, 'model_type', None)!r} is not supported; "
                          "export handles Llama-family models (model_type 'llama')")
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ExportError(f"rope_scaling {scaling} is not supported (only plain RoPE)")
    for key in ("attention_bias", "mlp_bias"):
        if getattr(config, key, False):
            raise ExportError(f"{key}=True is not supported (Llama linears without bias only)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act {config.hidden_act!r} is not supported (silu only)")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every compressible linear: nn.Linear, QuantLinear or Int8Linear, by full name."""
    out = compressible_linears(model)
    for name, m in out.items():
        if not isinstance(m, (nn.Linear, PackedLinear)):
            raise ExportError(f"{name} is a {type(m).__name__}; export knows nn.Linear, QuantLinear and "
                              "Int8Linear")
    return out


def describe_fallback(fallback: dict[str, str]) -> str:
    """{layer: reason} as one line per distinct reason: 'reason (n layers, e.g. name)'."""
    by_reason: dict[str, list[str]] = {}
    for name, why in fallback.items():
        by_reason.setdefault(why, []).append(name)
    return "; ".join(f"{why} ({len(names)} layer{'s' * (len(names) > 1)}, e.g. {sorted(names)[0]})"
                     for why, names in by_reason.items())


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 weight the layer applies (dequantized where it is quantized)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float()
    return layer.dequantize(torch.float32)


EXPORT_MARKER = ".frugalflow-export"  # in every directory write_atomically writes: what --overwrite may replace
GGUF_MAGIC = b"GGUF"


def why_not_replaceable(path: Path, is_dir: bool, keep: tuple[Path, ...] = ()) -> str | None:
    """Why an existing `path` must not be replaced by an export, or None when it is one (a GGUF
    file, or a directory of plain files holding EXPORT_MARKER) and holds none of `keep` (the input
    model, the working folder)."""
    resolved = path.resolve()
    for kept in (*keep, Path.cwd()):
        if kept.resolve() == resolved or kept.resolve().is_relative_to(resolved):
            return f"it is or holds {kept} (the input model or the working folder)"
    if path.is_dir() != is_dir:
        return f"it is not a {'directory' if is_dir else 'file'}"
    if is_dir:
        if not (path / EXPORT_MARKER).is_file():
            return f"it is not a frugalflow export (no {EXPORT_MARKER} in it)"
        if any(not p.is_file() or p.is_symlink() for p in path.iterdir()):
            return "it holds folders or links, which no export writes"
        return None
    with path.open("rb") as fh:
        return None if fh.read(4) == GGUF_MAGIC else "it is not a GGUF file"


def write_atomically(path: Path, write: Callable[[Path], None], is_dir: bool, overwrite: bool,
                     keep: tuple[Path, ...] = ()) -> Path:
    """Run write(tmp) on a sibling temporary file or directory, then rename it onto path. With
    `overwrite`, only a previous export is replaced (why_not_replaceable), never one of `keep`."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        why = "it is a link" if path.is_symlink() else why_not_replaceable(path, is_dir, keep)
        if why:
            raise FileExistsError(f"{path} exists and is not replaced: {why}; choose another path or remove "
                                  "it yourself")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    if is_dir:
        tmp.mkdir()
    try:
        write(tmp)
        if is_dir:
            (tmp / EXPORT_MARKER).write_text("written by frugalflow export; `--overwrite` may replace this folder\n")
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            if path.exists():
                os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if is_dir else tmp.unlink(missing_ok=True)
        raise
    return path
