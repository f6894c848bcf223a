"""AWQ (Lin et al. 2023): activation-aware per-channel scaling, then weight clipping, then RTN.

For each smoothing group of `arch.smooth` (a norm or linear `prev` feeding `linears`):
s = mean|x|^alpha (normalised by sqrt(max s * min s)), alpha on n_grid points in [0, 1);
the chosen alpha minimises the output error of the fake-quantized linears,
sum_l ||Q(W_l s) / s X - W_l X||^2, computed exactly from the Gram matrix H = 2/n X^T X
(tr(E H E^T)) instead of re-running the linears on every calibration token. alpha = 0 is
plain RTN, so the search never does worse than RTN on this objective. Scales fold into
`prev` (norm weight/bias, or the preceding linear's output rows: v_proj -> o_proj,
up_proj -> down_proj) and multiply the linears' input columns; pairs whose shapes do not
match (GQA v_proj -> o_proj) are skipped, as the references do. Then, per linear (q/k
skipped as in llm-awq: their error goes through the q.k product), clip values max|w| *
(1 - i / 20), i < 10, per group, minimise the group's own output error.

`awq_search` leaves the model untouched and returns small CPU tensors; `awq_apply` folds
them in (a float model's function is unchanged up to clipping); `awq_quantize` does both
then RTN. Scaling and clipping map zeros to zeros, so a pruned model stays pruned.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from frugalflow.arch import arch_of
from frugalflow.calibration import input_groups, relative_error, run_sequential
from frugalflow.quant.rtn import fake_quantize, rtn_linears

NO_CLIP_SUFFIXES = ("q_proj", "k_proj")  # llm-awq: "due to qk bmm, it is hard to clip precisely"


def _error(E: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T), the product in H's dtype (bfloat16: AMX / tensor cores), the sum in float32."""
    return ((E.to(H.dtype) @ H).float() * E).sum().item()


def _compatible(prev: nn.Module, linears: list[nn.Module]) -> bool:
    weight = getattr(prev, "weight", None)
    if weight is None:
        return False
    width = prev.out_features if isinstance(prev, nn.Linear) else weight.numel()
    return all(lin.in_features == width for lin in linears)


def _weight_means(Ws: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over rows of |w| / max|w| of its group, per input channel (duo scaling)."""
    rows = []
    for W in Ws:
        g = W.shape[1] if group_size == -1 else group_size
        Wg = W.abs().reshape(W.shape[0], -1, g)
        rows.append((Wg / (Wg.amax(-1, keepdim=True) + 1e-6)).reshape(W.shape))
    return torch.cat(rows).mean(0)


def search_scales(Ws: list[torch.Tensor], H: torch.Tensor, x_abs_mean: torch.Tensor, bits: int,
                  group_size: int, symmetric: bool, n_grid: int = 20, duo_scaling: bool = False,
                  matmul_dtype: torch.dtype = torch.float32):
    """Best per-input-channel scales for linears sharing input stats: (s, alpha, rtn error, best error).
    `matmul_dtype`: of the error terms' products (bfloat16 ranks the grid 3x faster on AMX; sums stay float32)."""
    grid = [(k / n_grid, False) for k in range(n_grid)]
    if duo_scaling:
        w_mean = _weight_means(Ws, group_size)
        grid = [(0.0, False)] + [(k / (n_grid - 2), True) for k in range(n_grid - 1)]
    best = (None, 0.0, float("inf"))
    first = None
    Hm = H.to(matmul_dtype)
    for alpha, duo in grid:
        s = x_abs_mean.pow(alpha)
        if duo:
            s = s / (w_mean.pow(1 - alpha) + 1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(_error(fake_quantize(W * s, bits, group_size, symmetric) / s - W, Hm) for W in Ws)
        first = err if first is None else first
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], first, best[2]


def search_clip(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per-(row, group) clip max [out, n_groups] minimising each group's output error x_g (w_g - q_g)."""
    rows, cols = W.shape
    g = cols if group_size == -1 else group_size
    ng = cols // g
    Wg = W.reshape(rows, ng, g)
    Hb = torch.stack([H[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(ng)])  # [ng, g, g]
    org_max = Wg.abs().amax(-1)
    best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        mx = (org_max * (1 - i / n_grid)).unsqueeze(-1)
        Wq = fake_quantize(torch.maximum(torch.minimum(Wg, mx), -mx).reshape(rows, cols), bits, group_size, symmetric)
        E = (Wq.reshape(rows, ng, g) - Wg).transpose(0, 1)  # [ng, rows, g]
        err = (torch.bmm(E, Hb) * E).sum(-1).T  # [rows, ng]
        better = err < best_err
        best_err[better], best_max[better] = err[better], mx.squeeze(-1)[better]
    return best_max


def _clip(W: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    rows, cols = W.shape
    c = clip.to(W).unsqueeze(-1)
    return torch.maximum(torch.minimum(W.reshape(rows, clip.shape[1], -1), c), -c).reshape(rows, cols)


def _group_of(arch) -> dict[str, str]:
    """Each linear's input group, named by its first linear (the key of the shared stats)."""
    return {n: g[0] for g in input_groups(arch) for n in g}


def search_layer_scales(layer: nn.Module, arch, stats: dict, bits: int, group_size: int, symmetric: bool,
                        n_grid: int = 20, duo_scaling: bool = False,
                        matmul_dtype: torch.dtype = torch.float32) -> tuple[list[dict], dict, dict]:
    """The scale search of one decoder layer from its calibration stats ("H", "x_abs_mean" per input group);
    the layer is not modified. Returns ([{"prev", "linears", "alpha", "scales"}], names relative to the layer;
    the scaled weights {linear: W}; the Gram matrices of the scaled inputs {first linear of a group: H})."""
    group_of = _group_of(arch)
    work = {n: layer.get_submodule(n).weight.data.float().clone() for n in arch.linears}
    gram = {key: stats[key]["H"] for key in set(group_of.values())}
    found = []
    for sm in arch.smooth:
        if not _compatible(layer.get_submodule(sm.prev), [layer.get_submodule(n) for n in sm.linears]):
            continue
        key = group_of[sm.linears[0]]
        s, alpha, _, _ = search_scales([work[n] for n in sm.linears], gram[key], stats[key]["x_abs_mean"],
                                       bits, group_size, symmetric, n_grid, duo_scaling, matmul_dtype)
        for n in sm.linears:
            work[n] *= s
        if sm.prev in work:
            work[sm.prev] /= s.unsqueeze(1)
        gram[key] = gram[key] / (s.unsqueeze(1) * s.unsqueeze(0))
        found.append({"prev": sm.prev, "linears": list(sm.linears), "alpha": alpha, "scales": s.cpu()})
    return found, work, gram


def prefixed(found: list[dict], prefix: str) -> list[dict]:
    """`search_layer_scales` entries with full names (`prefix`: the layer's dotted path and a dot)."""
    return [{**e, "prev": prefix + e["prev"], "linears": [prefix + n for n in e["linears"]]} for e in found]


def awq_search(model: nn.Module, calib_windows: torch.Tensor, bits: int, group_size: int, symmetric: bool,
               n_grid: int = 20, clip_search: bool = True, device: str = "cpu",
               on_progress: Callable[[int, int], None] | None = None, duo_scaling: bool = False,
               batch_size: int = 8) -> dict:
    """Search scales and clips layer by layer; the model is not modified.

    Returns {"bits", "group_size", "symmetric", "scales": [{"prev", "linears", "alpha", "scales"}],
    "clips": {linear: [out, n_groups]}, "stats": {linear: {"rtn_error", "awq_error"}}}, full names.
    """
    arch = arch_of(model)
    result = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "scales": [], "clips": {}}
    group_of = _group_of(arch)

    def solve(i, layer, stats):
        prefix = f"{arch.layers}.{i}."
        orig = {n: layer.get_submodule(n).weight.data.float() for n in arch.linears}
        found, work, gram = search_layer_scales(layer, arch, stats, bits, group_size, symmetric, n_grid, duo_scaling)
        result["scales"] += prefixed(found, prefix)
        out = {}
        for n in arch.linears:
            H = gram[group_of[n]]
            if clip_search and not n.endswith(NO_CLIP_SUFFIXES):
                clip = search_clip(work[n], H, bits, group_size, symmetric)
                result["clips"][prefix + n] = clip.cpu()
                work[n] = _clip(work[n], clip)
            W0 = orig[n]
            out[n] = {"rtn_error": relative_error(W0, fake_quantize(W0, bits, group_size, symmetric),
                                                  stats[group_of[n]]["H"]),
                      "awq_error": relative_error(work[n], fake_quantize(work[n], bits, group_size, symmetric), H)}
        return out

    result["stats"] = run_sequential(model, calib_windows, solve, needs=("H", "x_abs_mean"), device=device,
                                     batch_size=batch_size, propagate=False, on_progress=on_progress)
    return result


@torch.no_grad()
def awq_apply(model: nn.Module, result: dict) -> None:
    """Fold the searched scales into the model (prev /= s, linears' columns *= s), then clip."""
    for entry in result["scales"]:
        prev = model.get_submodule(entry["prev"])
        s = entry["scales"].to(prev.weight.device, torch.float32)
        if isinstance(prev, nn.Linear):
            prev.weight.data.copy_(prev.weight.data.float() / s.unsqueeze(1))
        else:
            prev.weight.data.copy_(prev.weight.data.float() / s)
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.copy_(prev.bias.data.float() / s)
        for name in entry["linears"]:
            lin = model.get_submodule(name)
            lin.weight.data.copy_(lin.weight.data.float() * s.to(lin.weight.device))
    for name, clip in result["clips"].items():
        lin = model.get_submodule(name)
        lin.weight.data.copy_(_clip(lin.weight.data.float(), clip))


@torch.no_grad()
def awq_quantize(model: nn.Module, calib_windows: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 n_grid: int = 20, clip_search: bool = True, device: str = "cpu",
                 on_progress: Callable[[int, int], None] | None = None, duo_scaling: bool = False,
                 batch_size: int = 8):
    """awq_search + awq_apply + RTN of every decoder linear: (qparams, stats, result).

    The model's weights end up dequantized, like `gptq_quantize`; qparams feed `pack.quantize_model`.
    """
    result = awq_search(model, calib_windows, bits, group_size, symmetric, n_grid, clip_search, device,
                        on_progress, duo_scaling, batch_size)
    awq_apply(model, result)
    arch = arch_of(model)
    linears = {f"{arch.layers}.{i}.{n}": layer.get_submodule(n)
               for i, layer in enumerate(model.get_submodule(arch.layers)) for n in arch.linears}
    qparams, _ = rtn_linears(linears, bits, group_size, symmetric, write_back=True)
    return qparams, result["stats"], result


def run(stage, model_dir, out_dir, ctx):
    """Recipe entry (config.AWQQuant): search, fold, RTN, pack; the searched scales and clips are kept."""
    from frugalflow.method import MethodResult, errors_as, float_model, layer_progress, save
    from frugalflow.quant import pack

    model, _ = float_model(model_dir, ctx["device"])
    qparams, layers, result = awq_quantize(model, ctx["calib"](), stage.bits, stage.group_size, stage.symmetric,
                                           n_grid=stage.n_grid, clip_search=stage.clip_search,
                                           device=ctx["device"], on_progress=layer_progress(ctx, "awq"))
    model.to("cpu")
    pack.quantize_model(model, qparams, stage.bits, stage.group_size, symmetric=stage.symmetric)
    save(model, out_dir, model_dir)
    return MethodResult({"layers": errors_as(layers, "awq_error")},
                        {"awq_scales": result["scales"], "awq_clips": result["clips"]})
