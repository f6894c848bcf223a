"""GPTQ (Frantar et al. 2022): column-by-column quantization with OBS error compensation.

Columns are quantized in order (or by decreasing H_ii with `act_order`); the rounding error
(w - q) / Hinv_ii of a column is spread over the columns not yet quantized, immediately
inside a lazy batch and with one matmul per batch beyond it (`calibration.lazy_step`: the
batch width changes only the speed, not the result). Grid: `rtn.compute_qparams` per group along the input
dimension, computed when the first column of the group is reached, on the weights as they
are then (after the updates from every column quantized so far); with `clip_search`, each row's
range in that group is shrunk by the factor that minimises its columns' own OBS loss,
sum (w - q)^2 / Hinv_ii^2 (`rtn.search_qparams`). Groups always follow the
ORIGINAL column index (static groups under act_order), so codes/scale/zero are the standard
grouped layout. With a keep-`mask`, pruned weights get the zero point as code (exactly 0)
while their error is still compensated. With `scale_format` log8, every group's scale is on
the matrix's log8 grid (rtn.log8_offset of the weights before the first column), clip
candidates included.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from frugalflow.arch import arch_of
from frugalflow.calibration import (
    column_loop_threads,
    hessian_inverse_upper,
    input_groups,
    lazy_step,
    relative_error,
    run_sequential,
)
from frugalflow.quant.rtn import LOG8, compute_qparams, dequantize, log8_offset, search_qparams

JOINT_SOLVE_BYTES = 1 << 26  # linears sharing inputs are solved as one matrix up to this float32 size


def _gptq(W: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor, bits: int,
          group_size: int, symmetric: bool, blocksize: int, keep: torch.Tensor | None, clip_search: bool = False,
          scale_format: str = "float16"):
    """W, keep in original column order; Hinv, dead in permuted order. Returns codes, scale, zero, row losses."""
    offset = log8_offset(W, bits) if scale_format == LOG8 else None
    with column_loop_threads(W.device):
        return _gptq_columns(W, Hinv, dead, perm, bits, group_size, symmetric, blocksize, keep, clip_search, offset)


def _gptq_columns(W, Hinv, dead, perm, bits, group_size, symmetric, blocksize, keep, clip_search, offset):
    rows, cols = W.shape
    G = cols if group_size == -1 else group_size
    if cols % G:
        raise ValueError(f"in_features {cols} is not a multiple of group_size {G}")
    maxq = 2 ** bits - 1
    invperm = torch.argsort(perm)
    Wp = W.float()[:, perm]  # advanced indexing copies: W is not modified
    Wp[:, dead] = 0
    keep_p = keep[:, perm] if keep is not None else None
    gidx = (perm // G).tolist()
    scale = torch.zeros(rows, cols // G, device=W.device)
    zero = torch.zeros_like(scale)
    codes_p = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    losses = torch.zeros(rows, device=W.device)
    s = z = None
    obs_weight = torch.diag(Hinv) ** -2 if clip_search else None  # a column's loss is err^2 / Hinv_ii^2
    inv_d = (1 / torch.diag(Hinv)).tolist()
    current_group, ready = -1, set()
    step = lazy_step(blocksize, 1, W.device)
    buf = torch.empty(rows, device=W.device)
    # a lazy batch is held transposed ([column, row]): every per-column op then runs on contiguous memory
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        W1 = Wp[:, i1:i2].T.contiguous()
        Err1 = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = gidx[i1 + i]
            if g != current_group:
                if g not in ready:  # first column of group g: grid from its current weights
                    ready.add(g)
                    pos = invperm[g * G:(g + 1) * G]
                    inb = pos < i2
                    cur = torch.empty(rows, G, device=W.device)
                    cur[:, inb] = W1[pos[inb] - i1].T
                    if not inb.all():
                        far = pos[~inb]
                        cur[:, ~inb] = Wp[:, far] - Err1[:i].T @ Hinv[i1:i1 + i, far]
                    if keep is not None:
                        cur = cur * keep[:, g * G:(g + 1) * G]
                    if obs_weight is None:
                        sg, zg = compute_qparams(cur, bits, -1, symmetric, log8_offset=offset)
                    else:
                        sg, zg = search_qparams(cur, bits, symmetric, obs_weight[pos], log8_offset=offset)
                    scale[:, g], zero[:, g] = sg[:, 0], zg[:, 0]
                s, z, current_group = scale[:, g], zero[:, g], g
            w = W1[i]
            qc = torch.div(w, s, out=Q1[i]).add_(z).round_().clamp_(0, maxq)
            if keep_p is not None:
                torch.where(keep_p[:, i1 + i], qc, z, out=qc)
            err = torch.sub(qc, z, out=buf).mul_(s).sub_(w).mul_(-inv_d[i1 + i])  # (w - dequantized) / Hinv_ii
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
            Err1[i] = err
        losses += (Err1 ** 2).sum(0) / 2
        codes_p[:, i1:i2] = Q1.T
        Wp[:, i2:].addmm_(Err1.T, Hinv[i1:i2, i2:], alpha=-1.0)
    return codes_p[:, invperm], scale, zero, losses


def _order(H: torch.Tensor, act_order: bool) -> torch.Tensor:
    if act_order:
        return torch.argsort(torch.diag(H), descending=True)
    return torch.arange(H.shape[0], device=H.device)


@torch.no_grad()
def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                         act_order: bool = False, blocksize: int = 128, dampening: float = 0.01,
                         mask: torch.Tensor | None = None, clip_search: bool = False, scale_format: str = "float16"):
    """Quantize W [out, in] given H = 2/n X^T X: (q uint8 [out, in], scale, zero [out, n_groups], loss).

    W ~ (q - zero) * scale group-wise along the input dim, in the original column order.
    """
    perm = _order(H, act_order)
    Hinv, dead = hessian_inverse_upper(H[perm][:, perm], dampening)
    q, scale, zero, losses = _gptq(W, Hinv, dead, perm, bits, group_size, symmetric, blocksize, mask, clip_search,
                                   scale_format)
    return q, scale, zero, losses.sum().item()


def gptq_quantize(model: nn.Module, calib_windows: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  act_order: bool = False, dampening: float = 0.01, device: str = "cpu",
                  on_progress: Callable[[int, int], None] | None = None, blocksize: int = 128,
                  batch_size: int = 8, preserve_zeros: bool = True, layer_grids: dict | None = None,
                  clip_search: bool = False, awq_scales: list | None = None, autocast: torch.dtype | None = None,
                  scale_format: str = "float16", awq_grid: int = 20, propagate: bool = True):
    """GPTQ every decoder linear: (qparams {full name: (q, scale, zero)}, stats {name: {...}}).

    The model's weights are replaced by their dequantized values (so later layers calibrate
    on the quantized model); pack them with `pack.quantize_model(model, qparams, ...)`.
    With `preserve_zeros`, weights that are exactly zero (a pruned model) stay zero.
    With a list as `awq_scales`, AWQ's scales are searched and folded in first, layer by layer (see gptq_solver),
    on `awq_grid` points. `propagate` False: every layer calibrates on the float model's activations.
    `autocast`: the dtype of the calibration forwards (calibration.run_sequential).
    `scale_format` LOG8: the scales of the main grid on log8 grids (not those of `layer_grids`).
    """
    qparams: dict[str, tuple] = {}
    solve = gptq_solver(arch_of(model), bits, group_size, symmetric, qparams, act_order=act_order, dampening=dampening,
                        blocksize=blocksize, preserve_zeros=preserve_zeros, layer_grids=layer_grids,
                        clip_search=clip_search, awq_scales=awq_scales, autocast=autocast,
                        scale_format=scale_format, awq_grid=awq_grid)
    needs = ("H",) if awq_scales is None else ("H", "x_abs_mean")
    stats = run_sequential(model, calib_windows, solve, needs=needs, device=device,
                           batch_size=batch_size, on_progress=on_progress, autocast=autocast, propagate=propagate)
    return qparams, stats


def gptq_solver(arch, bits: int, group_size: int, symmetric: bool, qparams: dict, act_order: bool = False,
                dampening: float = 0.01, blocksize: int = 128, preserve_zeros: bool = True, release: bool = False,
                layer_grids: dict | None = None, clip_search: bool = False, awq_scales: list | None = None,
                autocast: torch.dtype | None = None, scale_format: str = "float16", awq_grid: int = 20):
    """The calibration driver's `solve` for GPTQ: quantizes every linear of layer i in place (weights
    replaced by their dequantized values), puts its codes in `qparams` {full name: (q, scale, zero)}
    and returns per-linear stats. Each Hessian is dropped from `stats` once its group is done.
    `awq_scales` (a list): first AWQ's scale search on the layer's own statistics (quant/awq.py, no
    clipping; needs "x_abs_mean" too), folded into the layer, the Hessians rescaled to match; the
    scales found are appended to the list (full names); `awq_grid`: its n_grid. One calibration pass serves
    both searches.
    `autocast`: the calibration's dtype (calibration.run_sequential), also of AWQ's error products.
    `layer_grids` {layer index: (bits, group_size, symmetric)}: those layers on another grid than the rest.
    `release`: leave each solved linear's weight empty instead (the caller rebuilds it from
    `qparams`; the layer-streaming path does, to hold less while the MLP is solved)."""

    def solve(i, layer, stats):
        out = {}
        bits_i, group_i, symmetric_i = (layer_grids or {}).get(i, (bits, group_size, symmetric))
        format_i = "float16" if i in (layer_grids or {}) else scale_format
        if awq_scales is not None:
            from frugalflow.quant.awq import awq_apply, prefixed, search_layer_scales

            found, _, gram = search_layer_scales(layer, arch, stats, bits_i, group_i, symmetric_i, awq_grid,
                                                 matmul_dtype=autocast or torch.float32)
            awq_apply(layer, {"scales": found, "clips": {}})
            for key, H in gram.items():
                stats[key]["H"] = H
            awq_scales.extend(prefixed(found, f"{arch.layers}.{i}."))
        for group in input_groups(arch):
            H = stats[group[0]]["H"]
            H_err = H if autocast is None else H.to(autocast)  # for the reported errors only
            perm = _order(H, act_order)
            Hinv, dead = hessian_inverse_upper(H[perm][:, perm] if act_order else H, dampening)
            lins = [layer.get_submodule(n) for n in group]
            rows = sum(lin.out_features for lin in lins)
            # GPTQ treats rows independently: a group's linears are solved together (one column loop) while
            # that is small, one at a time (no concatenated copy) when it is large
            parts = [group] if rows * lins[0].in_features * 4 <= JOINT_SOLVE_BYTES else [(n,) for n in group]
            for k, part in enumerate(parts):
                part_lins = [layer.get_submodule(n) for n in part]
                Ws = [lin.weight.data.float() for lin in part_lins]
                W = torch.cat(Ws) if len(Ws) > 1 else Ws[0]
                keep = (W != 0) if preserve_zeros and bool((W == 0).any()) else None
                q, scale, zero, losses = _gptq(W, Hinv, dead, perm, bits_i, group_i, symmetric_i, blocksize, keep,
                                               clip_search, format_i)
                del W, keep
                if k == len(parts) - 1:
                    Hinv = None  # not needed for the errors below
                r0 = 0
                for name, lin, Wl in zip(part, part_lins, Ws):
                    r1 = r0 + Wl.shape[0]
                    ql, sl, zl = q[r0:r1].cpu(), scale[r0:r1].cpu(), zero[r0:r1].cpu()
                    W_new = dequantize(q[r0:r1], scale[r0:r1], zero[r0:r1], group_i)
                    qparams[f"{arch.layers}.{i}.{name}"] = (ql, sl, zl)
                    out[name] = {"recon_error": relative_error(Wl, W_new, H_err), "loss": losses[r0:r1].sum().item()}
                    if release:
                        lin.weight.data = torch.empty(0, dtype=lin.weight.dtype, device=lin.weight.device)
                    else:
                        lin.weight.data.copy_(W_new.to(lin.weight.dtype))
                    del W_new, Wl
                    r0 = r1
                del Ws, q, scale, zero, losses
            for name in group:
                stats[name].pop("H", None)
            del H, H_err
        return out

    return solve


def run(stage, model_dir, out_dir, ctx):
    """Recipe entry (config.GPTQQuant): codes packed as GPTQ chose them (or streamed layer by layer);
    with `awq_scales`, on the AWQ-scaled model; with `mixed`, the most sensitive layers on the finer grid."""
    from frugalflow.method import MethodResult, float_model, layer_progress, save
    from frugalflow.quant import pack
    from frugalflow.quant.rtn import grid_summary

    if stage.stream:
        from frugalflow.streaming import run_streaming

        return run_streaming(stage, model_dir, out_dir, ctx)
    model, _ = float_model(model_dir, ctx["device"])
    calib = ctx["calib"]()
    search, layer_grids = {}, {}
    if stage.mixed is not None:
        search["sensitivity"], layer_grids = mixed_layers(model, calib, stage, layer_progress(ctx, "sensitivity"))
    found = [] if stage.awq_scales else None
    qparams, layers = gptq_quantize(model, calib, stage.bits, stage.group_size, stage.symmetric,
                                    act_order=stage.act_order, dampening=stage.dampening,
                                    blocksize=stage.blocksize, device=ctx["device"],
                                    on_progress=layer_progress(ctx, "gptq"), layer_grids=layer_grids,
                                    clip_search=stage.clip_search, awq_scales=found,
                                    autocast=autocast_dtype(stage), scale_format=stage.scale_format,
                                    awq_grid=stage.awq_grid, propagate=stage.propagate)
    if found is not None:
        search["awq_scales"] = found
    model.to("cpu")
    pack.quantize_layers(model, qparams, (stage.bits, stage.group_size, stage.symmetric), layer_grids,
                         stage.scale_format)
    if stage.head_bits is not None:
        pack.quantize_head(model, stage.head_bits)
    save(model, out_dir, model_dir)
    return MethodResult({"layers": layers}, {"grids": grid_summary(qparams), **search})


def autocast_dtype(stage) -> torch.dtype | None:
    """The dtype of a stage's calibration forwards under autocast; None: float32, no autocast."""
    return torch.bfloat16 if getattr(stage, "calibration_dtype", "float32") == "bfloat16" else None


def mixed_layers(model, calib, stage, on_progress=None) -> tuple[dict, dict]:
    """The sensitivity search of a `mixed` stage: ({"kl": per-layer KL, "fine_layers": chosen indices, ...},
    {chosen index: the finer (bits, group_size, symmetric)}) (the `layer_grids` of gptq_quantize)."""
    from frugalflow.arch import arch_of, decoder_layers
    from frugalflow.quant.sensitivity import choose_layers, layer_sensitivity

    mixed = stage.mixed
    kl = layer_sensitivity(model, calib[:mixed.windows, :mixed.tokens], stage.bits, stage.group_size,
                           stage.symmetric, on_progress=on_progress)
    names = arch_of(model).linears
    weights = [sum(layer.get_submodule(n).weight.numel() for n in names) for layer in decoder_layers(model)]
    fine = choose_layers(kl, weights, mixed.share)
    symmetric = (mixed.bits == 8 or stage.symmetric) if mixed.symmetric is None else mixed.symmetric
    found = {"kl": kl, "fine_layers": fine, "grid": [stage.bits, stage.group_size],
             "fine_grid": [mixed.bits, mixed.group_size, symmetric]}
    return found, {i: (mixed.bits, mixed.group_size, symmetric) for i in fine}
