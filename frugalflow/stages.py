"""Run one compression stage: model directory in -> model directory out + stats.

`run_stage` picks the method's function from `METHOD_RUNNERS` by the stage config's
`method`; every runner loads its input, compresses, and saves a directory that
`models.load_model` reads back. Stats are plain JSON-able dicts (per-layer figures under
"layers"). Progress and per-step metrics go through the `report` callback.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from frugalflow import config as C
from frugalflow.arch import compressible_linears
from frugalflow.data import load_windows
from frugalflow.evaluate.perplexity import perplexity
from frugalflow.models import load_model, model_stats, save_model
from frugalflow.quant import pack, rtn

Report = Callable[[str, dict], None]  # (message, metrics) -> None


def _quiet(message: str, metrics: dict) -> None:
    pass


def float_model(model_dir: Path, device: str) -> tuple[torch.nn.Module, dict]:
    """Load a model with plain float linears; returns it and the grids of any quantized linears."""
    model = load_model(model_dir, device=device)
    grids = {name: (m.scales.float(), m.zeros.float(), m.bits, m.group_size)
             for name, m in pack.quantized_modules(model).items()}
    pack.dequantize_model(model)
    from frugalflow.quant.int8 import dequantize_int8_model

    dequantize_int8_model(model)  # a stage after int8 works on float weights again
    return model, grids


def _layer_progress(ctx: dict, what: str):
    report = ctx.get("report", _quiet)
    return lambda done, total: report(f"{what}: layer {done}/{total}", {})


def run_prune(stage, model_dir: Path, out_dir: Path, ctx: dict) -> dict:
    """Magnitude, Wanda or SparseGPT: prune every decoder linear in place, save dense."""
    model, _ = float_model(model_dir, ctx["device"])
    if stage.method == "magnitude":
        from frugalflow.prune.magnitude import prune_magnitude

        layers = prune_magnitude(model, stage.sparsity, stage.n_m)
    elif stage.method == "wanda":
        from frugalflow.prune.wanda import prune_wanda

        layers = prune_wanda(model, ctx["calib"](), stage.sparsity, stage.n_m, device=ctx["device"],
                             on_progress=_layer_progress(ctx, "wanda"))
    else:
        from frugalflow.prune.sparsegpt import prune_sparsegpt

        layers = prune_sparsegpt(model, ctx["calib"](), stage.sparsity, stage.n_m, blocksize=stage.blocksize,
                                 percdamp=stage.dampening, device=ctx["device"],
                                 on_progress=_layer_progress(ctx, "sparsegpt"))
    save_model(model, out_dir, tokenizer_dir=model_dir)
    return {"layers": layers}


def quantize_with_grids(model: torch.nn.Module, grids: dict) -> None:
    """Replace each gridded linear by a packed QuantLinear holding its codes on that grid."""
    linears = compressible_linears(model)
    by_bits: dict[tuple[int, int], dict] = {}
    for name, (scale, zero, bits, group_size) in grids.items():
        W = linears[name].weight.data
        q = rtn.quantize(W, scale, zero, bits, group_size)
        by_bits.setdefault((bits, group_size), {})[name] = (q, scale, zero)
    for (bits, group_size), qparams in by_bits.items():
        pack.quantize_model(model, qparams, bits, group_size)


def run_structured(stage, model_dir: Path, out_dir: Path, ctx: dict) -> dict:
    """Importance search on calibration data, then slicing into a smaller dense model."""
    from frugalflow.prune.importance import structured_importance
    from frugalflow.prune.structured import prune_structured

    model, _ = float_model(model_dir, ctx["device"])
    importance = structured_importance(model, ctx["calib"](), device=ctx["device"],
                                       on_progress=_layer_progress(ctx, "structured importance"))
    stats = prune_structured(model, importance, mlp_ratio=stage.mlp_ratio, heads_ratio=stage.heads_ratio,
                             hidden_ratio=stage.hidden_ratio, drop_layers=stage.drop_layers,
                             heads_mode=stage.heads_mode)
    save_model(model, out_dir, tokenizer_dir=model_dir)
    return {"structure": stats}


def run_int8(stage, model_dir: Path, out_dir: Path, ctx: dict) -> dict:
    """PyTorch-style int8 (dynamic per-token or statically calibrated activations)."""
    from frugalflow.quant.int8 import quantize_dynamic_int8, quantize_static_int8

    model, _ = float_model(model_dir, ctx["device"])
    if stage.method == "dynamic_int8":
        layers = quantize_dynamic_int8(model)
    else:
        layers = quantize_static_int8(model, ctx["calib"](), device=ctx["device"],
                                      on_progress=_layer_progress(ctx, "static int8"))
    save_model(model.to("cpu"), out_dir, tokenizer_dir=model_dir)
    return {"layers": layers}


def run_calibrated_quant(stage, model_dir: Path, out_dir: Path, ctx: dict) -> dict:
    """GPTQ or AWQ through the calibration driver; the codes they choose are packed as they are."""
    if getattr(stage, "stream", False):
        return _run_streaming(stage, model_dir, out_dir, ctx)
    model, _ = float_model(model_dir, ctx["device"])
    if stage.method == "gptq":
        from frugalflow.quant.gptq import gptq_quantize

        qparams, layers = gptq_quantize(model, ctx["calib"](), stage.bits, stage.group_size, stage.symmetric,
                                        act_order=stage.act_order, percdamp=stage.dampening,
                                        blocksize=stage.blocksize, device=ctx["device"],
                                        on_progress=_layer_progress(ctx, "gptq"))
    else:
        from frugalflow.quant.awq import awq_quantize

        qparams, layers, _ = awq_quantize(model, ctx["calib"](), stage.bits, stage.group_size, stage.symmetric,
                                          n_grid=stage.n_grid, clip_search=stage.clip_search,
                                          device=ctx["device"], on_progress=_layer_progress(ctx, "awq"))
    model.to("cpu")
    pack.quantize_model(model, qparams, stage.bits, stage.group_size, symmetric=stage.symmetric)
    save_model(model, out_dir, tokenizer_dir=model_dir)
    return {"layers": layers}


def _run_streaming(stage, model_dir: Path, out_dir: Path, ctx: dict) -> dict:
    """RTN or GPTQ one decoder layer at a time (frugalflow/streaming.py); the same output as in memory."""
    from frugalflow.streaming import stream_quantize

    progress = _layer_progress(ctx, f"{stage.method} (streaming)")
    stats = stream_quantize(model_dir, out_dir, stage.method, ctx["calib"]() if stage.method == "gptq" else None,
                            bits=stage.bits, group_size=stage.group_size, symmetric=stage.symmetric,
                            act_order=getattr(stage, "act_order", False), percdamp=getattr(stage, "dampening", 0.01),
                            blocksize=getattr(stage, "blocksize", 128), device=ctx["device"], tokenizer_dir=model_dir,
                            on_progress=lambda i, n, info: progress(i, n))
    return {"layers": stats["layers"], "seconds_per_layer": stats["seconds_per_layer"]}


def run_rtn(stage: C.RTNQuant, model_dir: Path, out_dir: Path, ctx: dict) -> dict:
    if stage.stream:
        return _run_streaming(stage, model_dir, out_dir, ctx)
    model, _ = float_model(model_dir, ctx["device"])
    layers, grids = {}, {}
    for name, linear in compressible_linears(model).items():
        W = linear.weight.data
        scale, zero = rtn.compute_qparams(W, stage.bits, stage.group_size, stage.symmetric)
        W_q = rtn.dequantize(rtn.quantize(W, scale, zero, stage.bits, stage.group_size), scale, zero,
                             stage.group_size)
        layers[name] = {"rel_error": float((W - W_q).norm() / W.norm().clamp(min=1e-12))}
        grids[name] = (scale, zero, stage.bits, stage.group_size)
    quantize_with_grids(model, grids)
    save_model(model, out_dir, tokenizer_dir=model_dir)
    return {"layers": layers}


def run_distill(stage, model_dir: Path, out_dir: Path, ctx: dict) -> dict:
    """Distill on one process, or with `processes` > 1 on that many under torchrun (distill/ddp.py),
    where every rank runs this function and rank 0 evaluates and saves."""
    from frugalflow.distill import ddp
    from frugalflow.distill.trainer import distill

    rank, world = ddp.rank_and_size()
    if stage.processes > 1 and world == 1:
        return ddp.launch_stage(stage, model_dir, out_dir, ctx)
    device = ctx["device"]
    student, grids = float_model(model_dir, device)
    # Keep a sparsity mask only after pruning: in a dense quantized model a weight that rounded
    # to zero is not pruned and may move.
    masks = {name: (m.weight.data != 0) for name, m in compressible_linears(student).items()
             if bool((m.weight.data == 0).any())} if ctx["pruned"] else {}
    teacher = load_model(ctx["teacher_dir"], device=device)
    windows = torch.cat([load_windows(ctx["data_dir"], split) for split in stage.train_splits])
    if len(windows) == 0:
        raise ValueError(f"distillation needs training windows: the splits {stage.train_splits} are empty "
                         "(data.train_windows / data.calib_windows)")
    report = ctx.get("report", _quiet)
    eval_windows = load_windows(ctx["data_dir"], "eval")
    ppl_before = perplexity(student, eval_windows) if rank == 0 else float("nan")
    report(f"perplexity before distillation {ppl_before:.3f}", {"ppl_before": ppl_before})

    def on_step(step: int, metrics: dict) -> None:
        report(f"distill step {step}/{stage.steps} loss {metrics['loss']:.4f}", {"step": step, **metrics})

    weights = {stage.method: 1.0, "ce": stage.ce_weight, "hidden": stage.hidden_weight}
    stats = distill(student, teacher, windows, steps=stage.steps, lr=stage.lr, batch_size=stage.batch_size,
                    seq_len=stage.seq_len, temperature=stage.temperature, warmup_steps=stage.warmup_steps,
                    grad_clip=stage.grad_clip, loss=stage.method, tau=getattr(stage, "tau", 10.0),
                    loss_weights={k: w for k, w in weights.items() if w}, grad_accum=stage.grad_accum,
                    checkpoint_dir=ctx.get("checkpoint_dir"),
                    checkpoint_every=stage.checkpoint_every, masks=masks or None, grids=grids or None,
                    seed=ctx.get("seed", 0), on_step=on_step, device=device)
    del teacher
    stats["processes"] = world
    if rank != 0:  # rank 0 evaluates and writes the output
        return stats
    stats["ppl_before"], stats["ppl_after"] = ppl_before, perplexity(student, eval_windows)
    stats["train_windows"] = len(windows)
    report(f"perplexity after distillation {stats['ppl_after']:.3f}", {"ppl_after": stats["ppl_after"]})
    if grids:
        quantize_with_grids(student, grids)
    save_model(student, out_dir, tokenizer_dir=model_dir)
    return stats


METHOD_RUNNERS: dict[str, Callable[..., dict]] = {
    "magnitude": run_prune,
    "wanda": run_prune,
    "sparsegpt": run_prune,
    "structured": run_structured,
    "rtn": run_rtn,
    "gptq": run_calibrated_quant,
    "awq": run_calibrated_quant,
    "dynamic_int8": run_int8,
    "static_int8": run_int8,
    "kl": run_distill,
    "tsld": run_distill,
}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but no CUDA device is available; use auto or cpu")
    return device


def run_stage(stage, model_dir: str | Path, out_dir: str | Path, *, data_dir: str | Path,
              teacher_dir: str | Path, device: str = "cpu", seed: int = 0,
              checkpoint_dir: str | Path | None = None, pruned: bool = False, report: Report = _quiet) -> dict:
    """Compress `model_dir` into `out_dir` with one stage config; returns the stage's stats.

    `pruned`: an earlier stage pruned the model, so its zeros are a mask to keep."""
    runner = METHOD_RUNNERS.get(stage.method)
    if runner is None:
        raise ValueError(f"unknown method {stage.method!r}; allowed: {', '.join(METHOD_RUNNERS)}")
    torch.manual_seed(seed)
    ctx = {"device": resolve_device(device), "data_dir": Path(data_dir), "teacher_dir": Path(teacher_dir),
           "seed": seed, "checkpoint_dir": checkpoint_dir, "pruned": pruned, "report": report,
           "calib": lambda: load_windows(data_dir, "calib")}
    started = time.perf_counter()
    stats = runner(stage, Path(model_dir), Path(out_dir), ctx)
    stats["seconds"] = time.perf_counter() - started
    stats.update(model_stats(load_model(out_dir, device="cpu")))
    return stats
