"""Logit distillation that respects the compression already applied to the student.

`distill` trains the student against a frozen teacher on random crops of token windows.
Pruning masks and fixed quantization grids are attached as weight parametrizations
(`attach_compression`): the forward pass sees W' = Q(W * mask), where Q rounds onto the
given per-group (scale, zero) grid with a straight-through gradient. After each optimizer
step the raw weights are re-masked, so a pruned weight is exactly zero throughout.
`final_weights` removes the parametrizations, leaving plain nn.Linear weights equal to the
W' the student was trained with: on the grid (re-quantizing them changes nothing) and
zero where pruned.

Checkpoints (one file, replaced atomically) hold the trainable parameters, optimizer,
scheduler, grad scaler, step and RNG states; a run that finds one resumes from its step
and ends bit-identical to an uninterrupted run. Nothing else in the directory is touched.
The library prints nothing: progress goes to `on_step(step, metrics)`.

Inside a torch.distributed process group (torchrun; see distill/ddp.py) the student is trained
under DistributedDataParallel: each rank takes its slice of the same global batch, rank 0
writes the checkpoint, every rank reads it.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from frugalflow.distill import ddp
from frugalflow.distill.losses import distill_loss
from frugalflow.integrity import load_checkpoint, save_checkpoint
from frugalflow.quant import rtn

CHECKPOINT_FILE = "distill_state.pt"
Grid = tuple[torch.Tensor, torch.Tensor, int, int]  # (scale, zero, bits, group_size)


# --------------------------------------------------------------------------- compression
class _RoundSTE(torch.autograd.Function):
    """Forward: W rounded onto a fixed grid (exactly rtn.dequantize(rtn.quantize(W)));
    backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, W, scale, zero, bits, group_size):
        q = rtn.quantize(W, scale, zero, bits, group_size)
        return rtn.dequantize(q, scale, zero, group_size, W.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


class Compressed(nn.Module):
    """Weight parametrization W -> Q(W * mask); either part may be absent."""

    def __init__(self, mask: torch.Tensor | None, grid: Grid | None):
        super().__init__()
        self.register_buffer("mask", None if mask is None else mask.bool())
        self.bits = self.group_size = None
        if grid is not None:
            scale, zero, bits, group_size = grid
            self.register_buffer("scale", scale.float().clone())
            self.register_buffer("zero", zero.float().clone())
            self.bits, self.group_size = int(bits), int(group_size)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            W = W * self.mask
        if self.bits is not None:
            W = _RoundSTE.apply(W, self.scale, self.zero, self.bits, self.group_size)
        return W


def _module(model: nn.Module, name: str) -> nn.Module:
    name = name.removesuffix(".weight")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"no module named {name!r} in the student") from None
    if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() != 2:
        raise KeyError(f"{name!r} has no 2-D weight to compress")
    return module


def attach_compression(model: nn.Module, masks: dict[str, torch.Tensor] | None = None,
                       grids: dict[str, Grid] | None = None) -> list[str]:
    """Parametrize `weight` of each named linear (full dotted names, as in
    arch.compressible_linears) with its mask (True = keep) and/or fixed grid.
    Pruned raw weights are zeroed now. Returns the names parametrized."""
    masks, grids = dict(masks or {}), dict(grids or {})
    names = sorted({n.removesuffix(".weight") for n in list(masks) + list(grids)})
    masks = {n.removesuffix(".weight"): m for n, m in masks.items()}
    grids = {n.removesuffix(".weight"): g for n, g in grids.items()}
    for name in names:
        module = _module(model, name)
        W = module.weight
        mask, grid = masks.get(name), grids.get(name)
        if mask is not None and mask.shape != W.shape:
            raise ValueError(f"mask for {name}: shape {tuple(mask.shape)} != weight {tuple(W.shape)}")
        if grid is not None:
            scale, zero, bits, group_size = grid
            n_groups = 1 if group_size == -1 else W.shape[1] // group_size
            if scale.shape != (W.shape[0], n_groups) or zero.shape != scale.shape:
                raise ValueError(f"grid for {name}: scale/zero {tuple(scale.shape)}/{tuple(zero.shape)}, "
                                 f"expected {(W.shape[0], n_groups)}")
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"{name} is already parametrized")
        p = Compressed(None if mask is None else mask.to(W.device), None if grid is None else
                       (grid[0].to(W.device), grid[1].to(W.device), grid[2], grid[3]))
        parametrize.register_parametrization(module, "weight", p)
        _remask(module)
    return names


def _parametrized(model: nn.Module):
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            comp = [p for p in module.parametrizations.weight if isinstance(p, Compressed)]
            if comp:
                yield name, module, comp[0]


@torch.no_grad()
def _remask(module: nn.Module) -> None:
    comp = module.parametrizations.weight[0]
    if comp.mask is not None:
        module.parametrizations.weight.original.mul_(comp.mask)


@torch.no_grad()
def final_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Bake the compression in: each parametrized linear gets a plain `weight` equal to
    Q(W * mask), parametrizations removed. Returns {name: weight}. Idempotent."""
    out = {}
    for name, module, _ in list(_parametrized(model)):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        out[name] = module.weight
    return out


# --------------------------------------------------------------------------- helpers
def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """transformers' linear warmup over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def sample_batch(windows: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` random crops of `seq_len` tokens, each from a random window."""
    n, length = windows.shape
    seq_len = min(seq_len, length)
    rows = torch.randint(n, (batch_size,), generator=generator)
    starts = torch.randint(length - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([windows[r, s:s + seq_len] for r, s in zip(rows.tolist(), starts.tolist())])


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 / AMX, as oneDNN reports it). Without
    it, bf16 matmuls are emulated: measured 6x slower than fp32 on an AVX2-only EPYC (512 x 576 x 1536)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _amp(device: torch.device, enabled: bool) -> tuple[Callable, torch.amp.GradScaler | None]:
    """Mixed precision: fp16 + loss scaling on a GPU without bf16, bf16 autocast where the hardware
    has bf16, none on a CPU without native bf16 (fp32 is faster there)."""
    if not enabled or (device.type == "cpu" and not cpu_has_native_bf16()):
        return contextlib.nullcontext, None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


def _atomic_save(obj: dict, path: Path) -> None:
    save_checkpoint(obj, path)  # checksummed, temp file + fsync + rename (frugalflow/integrity.py)


# settings that must match for a checkpoint to be resumed (steps may grow)
_RESUME_KEYS = ("lr", "batch_size", "seq_len", "temperature", "warmup_steps", "grad_clip", "loss_weights",
                "seed", "grad_accum", "weight_decay", "tau", "tsld_scale_by", "n_windows")


# --------------------------------------------------------------------------- training
def distill(student: nn.Module, teacher: nn.Module, train_windows: torch.Tensor, *, steps: int,
            lr: float = 1e-5, batch_size: int = 2, seq_len: int = 256, temperature: float = 1.0,
            warmup_steps: int = 0, grad_clip: float = 1.0, loss: str = "kl",
            loss_weights: dict[str, float] | None = None, tau: float = 10.0, tsld_scale_by: str = "target",
            hidden_layers: list[int] | None = None, grad_accum: int = 1, weight_decay: float = 0.0,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
            masks: dict[str, torch.Tensor] | None = None, grids: dict[str, Grid] | None = None,
            seed: int = 0, on_step: Callable[[int, dict], None] | None = None, log_every: int = 1,
            device: str | torch.device = "cpu", amp: bool = True, finalize: bool = True) -> dict:
    """Distill `teacher` into `student` (both moved to `device`; student trained in place).

    loss: 'kl' or 'tsld'; `loss_weights` (keys kl/tsld/ce/hidden) overrides it with a mix.
    masks / grids: {linear name: bool keep-mask} / {linear name: (scale, zero, bits, group_size)}
    kept exact during training. Each step uses `grad_accum` micro-batches of `batch_size`
    crops of `seq_len` tokens. checkpoint_dir: resume from the checkpoint there if any;
    write one every `checkpoint_every` steps and at the end. on_step(step, {'loss', 'lr',
    'grad_norm', <loss parts>}) after every `log_every`-th step and the last one (step is
    1-based). finalize: bake masks/grids into plain weights at the end (see final_weights),
    also if training raises. Returns {'steps', 'final_loss', 'seconds', 'seconds_per_step',
    'resumed_from', 'steps_run'}.
    """
    if loss not in ("kl", "tsld"):
        raise ValueError(f"loss must be 'kl' or 'tsld', got {loss!r}")
    if train_windows.dim() != 2 or train_windows.shape[0] == 0:
        raise ValueError(f"train_windows must be a non-empty [N, L] tensor, got {tuple(train_windows.shape)}")
    if steps < 1 or batch_size < 1 or grad_accum < 1 or log_every < 1:
        raise ValueError("steps, batch_size, grad_accum and log_every must be >= 1")
    world = ddp.rank_and_size()[1]
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} (the global batch) must be a multiple of the {world} "
                         "processes: each takes an equal slice")
    weights = dict(loss_weights) if loss_weights else {loss: 1.0}
    need_hidden = bool(weights.get("hidden"))
    device = torch.device(device)
    settings = dict(lr=lr, batch_size=batch_size, seq_len=seq_len, temperature=temperature,
                    warmup_steps=warmup_steps, grad_clip=grad_clip, loss_weights=weights, seed=seed,
                    grad_accum=grad_accum, weight_decay=weight_decay, tau=tau,
                    tsld_scale_by=tsld_scale_by, n_windows=int(train_windows.shape[0]))
    t0 = time.perf_counter()
    student.to(device)
    teacher.to(device).eval().requires_grad_(False)
    attach_compression(student, masks, grids)
    try:
        cuda_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_ids):
            stats = _train(student, teacher, train_windows, steps, settings, weights, need_hidden, hidden_layers,
                           checkpoint_dir, checkpoint_every, on_step, log_every, device, amp)
    finally:
        if finalize:
            final_weights(student)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _train(student, teacher, windows, steps, settings, weights, need_hidden, hidden_layers, checkpoint_dir,
           checkpoint_every, on_step, log_every, device, amp) -> dict:
    torch.manual_seed(settings["seed"])
    generator = torch.Generator().manual_seed(settings["seed"])
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the student has no trainable parameters")
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"])
    scheduler = lr_schedule(optimizer, settings["warmup_steps"], steps)
    autocast, scaler = _amp(device, amp)
    comp = list(_parametrized(student))
    rank, world = ddp.rank_and_size()

    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    start, last_loss = 0, float("nan")
    state = load_checkpoint(path)  # None: no checkpoint, or a corrupt one (logged, set aside)
    if state is not None:
        changed = [k for k in _RESUME_KEYS if state["settings"].get(k) != settings[k]]
        if changed:
            raise ValueError(f"checkpoint {path} was written with different settings: "
                             + ", ".join(f"{k}={state['settings'].get(k)!r} (now {settings[k]!r})" for k in changed))
        if state["step"] > steps:
            raise ValueError(f"checkpoint {path} is at step {state['step']}, beyond the {steps} steps asked for")
        missing = [n for n, _ in named if n not in state["student"]]
        if missing:
            raise ValueError(f"checkpoint {path} lacks trainable parameters {missing[:3]}...")
        with torch.no_grad():
            for n, p in named:
                p.copy_(state["student"][n])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start, last_loss = int(state["step"]), float(state["last_loss"])

    def save(step: int) -> None:
        if rank != 0:  # one writer; the state is the same on every rank
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save({
            "step": step, "last_loss": last_loss, "settings": settings,
            "student": {n: p.detach().cpu() for n, p in named},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }, path)

    student.train()
    forward = ddp.wrap(student, device) if world > 1 else student
    train_t0 = time.perf_counter()
    for step in range(start, steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss, parts_sum = 0.0, {}
        for micro in range(settings["grad_accum"]):
            # every rank draws the same global batch and keeps its slice
            x = ddp.local_slice(sample_batch(windows, settings["batch_size"], settings["seq_len"], generator))
            x = x.to(device)
            with torch.inference_mode(), autocast():
                t_out = teacher(input_ids=x, use_cache=False, output_hidden_states=need_hidden)
            # inference tensors cannot enter autograd: clone outside inference mode
            t_logits = t_out.logits.float().clone()
            t_hidden = tuple(h.clone() for h in t_out.hidden_states) if need_hidden else None
            del t_out
            with ddp.no_sync(forward, micro + 1 < settings["grad_accum"]):
                with autocast():
                    s_out = forward(input_ids=x, use_cache=False, output_hidden_states=need_hidden)
                total, parts = distill_loss(weights, s_out.logits, t_logits, x, temperature=settings["temperature"],
                                            tau=settings["tau"], tsld_scale_by=settings["tsld_scale_by"],
                                            student_hidden=s_out.hidden_states if need_hidden
                                            else None, teacher_hidden=t_hidden, hidden_layers=hidden_layers)
                scaled = total / settings["grad_accum"]
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            step_loss += float(total.detach()) / settings["grad_accum"]
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / settings["grad_accum"]
        if world > 1:  # the global batch's mean: every slice has the same number of tokens
            keys = sorted(parts_sum)
            step_loss, *means = ddp.mean_across([step_loss, *(parts_sum[k] for k in keys)])
            parts_sum = dict(zip(keys, means))
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings["grad_clip"]))
        lr_now = scheduler.get_last_lr()[0]
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        for _, module, _ in comp:
            _remask(module)
        last_loss = step_loss
        done = step + 1
        if path is not None and ((checkpoint_every and done % checkpoint_every == 0) or done == steps):
            save(done)
        if on_step is not None and (done % log_every == 0 or done == steps):
            on_step(done, {"loss": step_loss, "lr": lr_now, "grad_norm": grad_norm, **parts_sum})
    ddp.barrier()  # the last checkpoint is written before any rank returns
    student.eval()
    steps_run = steps - start
    train_seconds = time.perf_counter() - train_t0
    return {"steps": steps, "final_loss": last_loss, "seconds_per_step": train_seconds / steps_run if steps_run
            else 0.0, "resumed_from": start, "steps_run": steps_run}


def run(stage, model_dir: Path, out_dir: Path, ctx: dict):
    """Recipe entry (config.KLDistill, config.TSLDDistill): distill on one process, or with
    `processes` > 1 on that many under torchrun (distill/ddp.py), where every rank runs this
    function and rank 0 evaluates and saves."""
    from frugalflow.arch import compressible_linears
    from frugalflow.data import load_windows
    from frugalflow.distill import ddp
    from frugalflow.distill.train_data import training_windows
    from frugalflow.evaluate.perplexity import perplexity
    from frugalflow.method import MethodResult, float_model, quantize_with_grids, quiet, save
    from frugalflow.models import load_model

    rank, world = ddp.rank_and_size()
    if stage.processes > 1 and world == 1:
        return MethodResult(ddp.launch_stage(stage, model_dir, out_dir, ctx))
    device = ctx["device"]
    student, grids = float_model(model_dir, device)
    # Keep a sparsity mask only after pruning: in a dense quantized model a weight that rounded
    # to zero is not pruned and may move.
    masks = {name: (m.weight.data != 0) for name, m in compressible_linears(student).items()
             if bool((m.weight.data == 0).any())} if ctx["pruned"] else {}
    report = ctx.get("report", quiet)
    windows = training_windows(stage, ctx["data_dir"], ctx["teacher_dir"], ctx.get("seed", 0), report, device)
    if len(windows) == 0:
        raise ValueError(f"distillation needs training windows: the splits {stage.train_splits} are empty "
                         "(data.train_windows / data.calib_windows)")
    teacher = load_model(ctx["teacher_dir"], device=device)
    eval_windows = load_windows(ctx["data_dir"], "eval")
    ppl_before = perplexity(student, eval_windows) if rank == 0 else float("nan")
    report(f"perplexity before distillation {ppl_before:.3f}", {"ppl_before": ppl_before})

    bar = ctx.get("progress")

    def on_step(step: int, metrics: dict) -> None:
        report(f"distill step {step}/{stage.steps} loss {metrics['loss']:.4f}", {"step": step, **metrics})
        if bar is not None:
            bar(step, stage.steps)

    weights = {stage.method: 1.0, "ce": stage.ce_weight, "hidden": stage.hidden_weight}
    stats = distill(student, teacher, windows, steps=stage.steps, lr=stage.lr, batch_size=stage.batch_size,
                    seq_len=stage.seq_len, temperature=stage.temperature, warmup_steps=stage.warmup_steps,
                    grad_clip=stage.grad_clip, loss=stage.method, tau=getattr(stage, "tau", 10.0),
                    tsld_scale_by=getattr(stage, "scale_by", "target"),
                    loss_weights={k: w for k, w in weights.items() if w}, grad_accum=stage.grad_accum,
                    checkpoint_dir=ctx.get("checkpoint_dir"),
                    checkpoint_every=stage.checkpoint_every, masks=masks or None, grids=grids or None,
                    seed=ctx.get("seed", 0), on_step=on_step, device=device)
    del teacher
    stats["processes"] = world
    if rank != 0:  # rank 0 evaluates and writes the output
        return MethodResult(stats)
    stats["ppl_before"], stats["ppl_after"] = ppl_before, perplexity(student, eval_windows)
    stats["train_windows"] = len(windows)
    report(f"perplexity after distillation {stats['ppl_after']:.3f}", {"ppl_after": stats["ppl_after"]})
    if grids:
        quantize_with_grids(student, grids)
    save(student, out_dir, model_dir)
    return MethodResult(stats)
