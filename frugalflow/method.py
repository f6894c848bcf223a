"""The shape every compression method shares: one entry `run(stage, model_dir, out_dir, ctx)`
returning a `MethodResult`, plus the helpers those entries use.

Each method config class in `config.py` names its entry (`entry = "module:function"`);
`entry_for` resolves it, so the method registry is the recipe's discriminated union itself.
`ctx` holds device, data_dir, teacher_dir, seed, checkpoint_dir, pruned, report and `calib()`.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ERROR_KEY = "recon_error"  # the per-layer error every method reports (relative, output space where calibrated)
SEARCH_DIR = "search"  # small search results, one JSON file per name, inside the stage output


@dataclass
class MethodResult:
    """stats: JSON-able, per-linear figures under "layers" (each with ERROR_KEY where the
    method changes weights); search: name -> small JSON-able search result."""

    stats: dict
    search: dict[str, Any] = field(default_factory=dict)


Entry = Callable[[Any, Path, Path, dict], MethodResult]


def entry_for(stage) -> Entry:
    """The `run` function the stage's config class names."""
    module, _, name = type(stage).entry.partition(":")
    return getattr(importlib.import_module(module), name)


def errors_as(layers: dict[str, dict], key: str) -> dict[str, dict]:
    """Per-linear stats with the method's own error name `key` renamed to ERROR_KEY."""
    return {n: {(ERROR_KEY if k == key else k): v for k, v in s.items()} for n, s in layers.items()}


def jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_search(out_dir: Path, search: dict[str, Any]) -> list[str]:
    """Write each search result as `search/<name>.json` in the output directory; returns the names."""
    if not search:
        return []
    folder = Path(out_dir) / SEARCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in search.items():
        (folder / f"{name}.json").write_text(json.dumps(jsonable(value), default=float) + "\n")
    return sorted(search)


def quiet(message: str, metrics: dict) -> None:
    pass


def layer_progress(ctx: dict, what: str) -> Callable[[int, int], None]:
    """The (layer index, n_layers) callback of a layer loop: a report line and the stage's progress
    bar (ctx["progress"]), both counting finished layers."""
    report, bar = ctx.get("report", quiet), ctx.get("progress")

    def progress(index: int, total: int) -> None:
        report(f"{what}: layer {index + 1}/{total}", {})
        if bar is not None:
            bar(index + 1, total)

    return progress


def float_model(model_dir: Path, device: str) -> tuple[torch.nn.Module, dict]:
    """Load a model with plain float linears; returns it and the grids of any quantized linears."""
    from frugalflow.models import load_model
    from frugalflow.quant import pack
    from frugalflow.quant.runtime import dequantize_all

    model = load_model(model_dir, device=device)
    grids = {name: (m.scales.float(), m.zeros.float(), m.bits, m.group_size)
             for name, m in pack.quantized_modules(model).items()}
    dequantize_all(model)  # a stage after a quantized one works on float weights again
    return model, grids


def save(model: torch.nn.Module, out_dir: Path, model_dir: Path) -> None:
    from frugalflow.models import save_model

    save_model(model, out_dir, tokenizer_dir=model_dir)


def quantize_with_grids(model: torch.nn.Module, grids: dict) -> None:
    """Replace each gridded linear by a packed QuantLinear holding its codes on that grid
    {name: (scale, zero, bits, group_size)} (a distilled student back onto its teacher-stage grid; a
    gridded output head takes its tied input embedding along). Scales on a log8 grid are stored log8 again,
    others float16."""
    from frugalflow.quant import pack, rtn

    by_grid: dict[tuple[int, int, str], dict] = {}
    for name, (scale, zero, bits, group_size) in grids.items():
        q = rtn.quantize(model.get_submodule(name).weight.data, scale, zero, bits, group_size)
        by_grid.setdefault((bits, group_size, _scale_format(scale)), {})[name] = (q, scale, zero)
    for (bits, group_size, scale_format), qparams in by_grid.items():
        pack.quantize_model(model, qparams, bits, group_size, scale_dtype=scale_format)


def _scale_format(scale: torch.Tensor) -> str:
    from frugalflow.quant import rtn

    try:
        rtn.log8_codes(scale)
    except ValueError:
        return "float16"
    return rtn.LOG8
