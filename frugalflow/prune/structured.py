"""Structured width and depth pruning as in Minitron (Muralidharan et al. 2024; Sreenivas et al.
2024), with importance from activations on calibration data.

Two steps, so the search is separate from the apply and its result is a small JSON-able dict:

`structured_importance(model, windows)` (in `frugalflow.prune.importance`) is the search: per
layer MLP-channel, head and block importance, model-wide embedding-channel importance and
the norms' input energy, from one pass of the calibration driver.

`prune_structured(model, importance, ...)` slices weights in place and rewrites the config, so
the result is a plain Hugging Face model (save_pretrained / AutoModelForCausalLM.from_pretrained,
no custom code). Removing embedding channels changes what an RMSNorm divides by (the root mean
square over the kept channels instead of all), so each RMSNorm weight is multiplied by
sqrt(H * E_kept / (H_kept * E_all)) with E its input energy on the calibration windows: the
ratio of the mean squares, kept channels to all. Where the removed channels carry no energy this
restores the norm's output exactly. The axes:
  MLP    every layer keeps its own top channels, but all keep the same count (the config has
         one intermediate size): round(I * (1 - mlp_ratio)) to the nearest multiple of
         `multiple_of` (16, kernel-friendly), at least one multiple.
  heads  head_dim is kept and written to the config. heads_mode="groups" drops whole KV groups
         (a KV head and its query heads; group score = L2 of its heads' scores), shrinking the KV
         cache too; "query" drops the same number of query heads inside every group. Every layer
         keeps the same counts and num_attention_heads stays a multiple of num_key_value_heads.
  depth  the `drop_layers` layers with the lowest BI go (one-shot ranking, as ShortGPT); the
         kept modules get their new layer_idx; num_hidden_layers and layer_types are rewritten.
  hidden the same top channels go everywhere (the residual stream is one space): embedding and
         lm_head columns (a tied lm_head stays tied), q/k/v/gate/up input columns, o/down output
         rows, every norm weight including the final one; hidden_size is rounded as the MLP
         width is (`hidden_keep_count`); head_dim is written to the config (no longer
         hidden_size / num_attention_heads).
         RMSNorm then averages over the kept channels only; nothing compensates (as Minitron:
         distillation follows).
The axes slice different dimensions, so any combination gives consistent shapes.
Not done: Minitron's head-residual trick and the distillation that must follow. Names and config
keys come from `arch_of(model).structure`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from frugalflow.arch import Structure, arch_of, decoder_layers
from frugalflow.prune.importance import head_dim_of, shape_of, structure_of

HEADS_MODES = ("groups", "query")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _keep_count(width: int, ratio: float, multiple_of: int, field: str) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{field} must be in [0, 1), got {ratio}")
    target = width * (1.0 - ratio)
    if multiple_of <= 1 or width < multiple_of:
        return min(width, max(1, _round_half_up(target)))
    return min(width, max(multiple_of, multiple_of * _round_half_up(target / multiple_of)))


def mlp_keep_count(intermediate: int, ratio: float, multiple_of: int = 16) -> int:
    """Channels every layer keeps: intermediate * (1 - ratio) to the nearest multiple of
    `multiple_of`, at least one multiple, at most `intermediate` (plain rounding, at least 1,
    when intermediate < multiple_of)."""
    return _keep_count(intermediate, ratio, multiple_of, "mlp_ratio")


def hidden_keep_count(hidden: int, ratio: float, multiple_of: int = 16) -> int:
    """Embedding channels kept: the rule of `mlp_keep_count` applied to hidden_size."""
    return _keep_count(hidden, ratio, multiple_of, "hidden_ratio")


def head_counts(n_heads: int, n_kv: int, ratio: float, mode: str = "groups") -> tuple[int, int]:
    """(num_attention_heads, num_key_value_heads) after pruning `ratio` of the query heads."""
    if mode not in HEADS_MODES:
        raise ValueError(f"heads_mode must be one of {HEADS_MODES}, got {mode!r}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"heads_ratio must be in (0, 1) to prune heads, got {ratio}")
    rep = n_heads // n_kv
    if mode == "groups":
        drop = _round_half_up(n_kv * ratio)
        if not 0 < drop < n_kv:
            raise ValueError(f"heads_ratio={ratio} drops {drop} of {n_kv} KV groups; need 1..{n_kv - 1} "
                             f"(ratio steps of 1/{n_kv}, or heads_mode='query')")
        return (n_kv - drop) * rep, n_kv - drop
    drop = _round_half_up(rep * ratio)
    if not 0 < drop < rep:
        raise ValueError(f"heads_ratio={ratio} drops {drop} of the {rep} query heads per KV group; need "
                         f"1..{rep - 1} (ratio steps of 1/{rep}, or heads_mode='groups')")
    return n_kv * (rep - drop), n_kv


def top_indices(scores, k: int) -> torch.Tensor:
    """Indices of the k highest scores in ascending index order (ties: lower index wins)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    return torch.argsort(-s, stable=True)[:k].sort().values


def head_plan(scores, n_heads: int, n_kv: int, new_heads: int, new_kv: int) -> tuple[list[int], list[int]]:
    """Query heads and KV heads one layer keeps, given its head scores. Query head h reads
    KV head h // (n_heads // n_kv); kept heads stay grouped and in order, so that holds after."""
    rep, new_rep = n_heads // n_kv, new_heads // new_kv
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(n_kv, rep)
    if new_kv < n_kv:
        kv = top_indices(s.norm(dim=1), new_kv).tolist()
        return [g * rep + r for g in kv for r in range(rep)], kv
    return [g * rep + int(r) for g in range(n_kv) for r in top_indices(s[g], new_rep)], list(range(n_kv))


def _check(model: nn.Module, importance: dict, st: Structure, heads: bool, hidden: bool) -> None:
    shape = shape_of(model, st)
    want = {"n_layers": shape["num_hidden_layers"], "intermediate_size": shape["intermediate_size"]}
    if heads:
        want.update({k: shape[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim")})
    if hidden:
        want["hidden_size"] = shape["hidden_size"]
    wrong = {k: (importance.get(k), v) for k, v in want.items() if importance.get(k) != v}
    if wrong:
        raise ValueError(f"importance was computed for another shape (importance, model): {wrong}; "
                         "recompute it on this model")


# --------------------------------------------------------------------------- slicing
def _linear(layer: nn.Module, name: str) -> nn.Linear:
    lin = layer.get_submodule(name)
    if type(lin) is not nn.Linear:
        raise TypeError(f"{name} is {type(lin).__name__}, not nn.Linear: prune before quantizing")
    return lin


def _keep_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(0, idx).clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data.index_select(0, idx).clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features = len(idx)


def _keep_cols(lin: nn.Linear, idx: torch.Tensor) -> None:
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(1, idx).clone(), requires_grad=lin.weight.requires_grad)
    lin.in_features = len(idx)


def _keep_norm(norm: nn.Module, idx: torch.Tensor) -> None:
    """Slice a norm's per-channel weight (and bias) to the kept channels."""
    for key in ("weight", "bias"):
        p = getattr(norm, key, None)
        if p is not None:
            setattr(norm, key, nn.Parameter(p.data.index_select(0, idx.to(p.device)).clone(),
                                            requires_grad=p.requires_grad))
    if isinstance(getattr(norm, "normalized_shape", None), tuple):
        norm.normalized_shape = (len(idx),)


def _rms_rescale(norm: nn.Module, energy: list[float] | None, idx: torch.Tensor) -> float | None:
    """Multiply an RMSNorm's (already sliced) weight by sqrt(H * E[idx] / (H_kept * E)), the
    ratio of its input's mean square over the kept channels to that over all (module docstring).
    None (nothing done) for other norms, without energies or for a silent input."""
    weight = getattr(norm, "weight", None)
    if energy is None or weight is None or "RMSNorm" not in type(norm).__name__:
        return None
    e = torch.as_tensor(energy, dtype=torch.float64)
    if e.sum() <= 0:
        return None
    scale = math.sqrt(len(e) * float(e[idx.cpu()].sum()) / (len(idx) * float(e.sum())))
    weight.data.mul_(scale)
    return scale


def _prune_hidden(model: nn.Module, st: Structure, idx: torch.Tensor, energy: dict | None = None,
                  layer_ids: list[int] | None = None) -> list[float]:
    """Keep embedding channels `idx` everywhere the residual stream is read or written; with
    `energy` (importance["norm_energy"]) rescale every RMSNorm. `layer_ids`: the original index of
    each remaining layer (after a depth drop). Returns the scales applied."""
    arch = arch_of(model)
    old, n = getattr(model.config, st.hidden_key), len(idx)
    emb = model.get_submodule(arch.embed)
    if type(emb) is not nn.Embedding:
        raise TypeError(f"{arch.embed} is {type(emb).__name__}, not nn.Embedding")
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb.weight = nn.Parameter(emb.weight.data.index_select(1, idx.to(emb.weight.device)).clone(),
                              requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = n
    if tied:
        head.weight = emb.weight
        head.in_features = n
    elif head is not None:
        if type(head) is not nn.Linear:
            raise TypeError(f"lm_head is {type(head).__name__}, not nn.Linear")
        _keep_cols(head, idx)
    scales = []
    layers = decoder_layers(model)
    for j, layer in zip(layer_ids or range(len(layers)), layers):
        for name in (st.q, *st.kv, *st.mlp_in):
            _keep_cols(_linear(layer, name), idx)
        for name in (st.o, st.mlp_out):
            _keep_rows(_linear(layer, name), idx)
        for k, name in enumerate(st.norms):
            _keep_norm(layer.get_submodule(name), idx)
            scales.append(_rms_rescale(layer.get_submodule(name), energy and energy["layers"][j][k], idx))
        for module in layer.modules():  # informational copies of the width (LlamaMLP, decoder layer)
            if getattr(module, "hidden_size", None) == old:
                module.hidden_size = n
    _keep_norm(model.get_submodule(arch.final_norm), idx)
    scales.append(_rms_rescale(model.get_submodule(arch.final_norm), energy and energy["final"], idx))
    return [x for x in scales if x is not None]


def _channels(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def _parent(layer: nn.Module, name: str) -> nn.Module:
    parent = name.rpartition(".")[0]
    return layer.get_submodule(parent) if parent else layer


@torch.no_grad()
def prune_structured(model: nn.Module, importance: dict, mlp_ratio: float = 0.25, heads_ratio: float = 0.0,
                     drop_layers: int = 0, heads_mode: str = "groups", multiple_of: int = 16,
                     hidden_ratio: float = 0.0) -> dict:
    """Prune `model` in place from `importance` (see module docstring); returns
    {"before", "after": shapes and n_params, "param_reduction", "mlp_ratio_effective",
    "heads_ratio_effective", "hidden_ratio_effective", "dropped_layers", "kept": per-layer kept
    MLP channels, query heads, KV heads (original numbering), kept layers and the kept embedding
    channels}. A ratio > 0 that prunes nothing after rounding is an error; ratios and shapes
    are checked before the first weight is sliced."""
    st = structure_of(model)
    cfg = model.config
    if heads_ratio > 0 and not st.q:
        raise ValueError(f"head pruning is not supported for model_type {cfg.model_type!r} "
                         "(head_dim is not a config key there)")
    if hidden_ratio > 0 and not (st.norms and st.q):
        raise ValueError(f"hidden (embedding-channel) pruning is not supported for model_type {cfg.model_type!r}")
    _check(model, importance, st, heads=heads_ratio > 0, hidden=hidden_ratio > 0)
    layers = decoder_layers(model)
    n_layers = len(layers)
    if not 0 <= drop_layers < n_layers:
        raise ValueError(f"drop_layers must be in [0, {n_layers - 1}], got {drop_layers}")
    before = shape_of(model, st)
    if heads_ratio > 0:
        new_heads, new_kv = head_counts(before["num_attention_heads"], before["num_key_value_heads"],
                                        heads_ratio, heads_mode)
    if hidden_ratio > 0:
        n_hidden = hidden_keep_count(before["hidden_size"], hidden_ratio, multiple_of)
        if n_hidden == before["hidden_size"]:
            raise ValueError(f"hidden_ratio={hidden_ratio} keeps all {n_hidden} channels after rounding "
                             f"to {multiple_of}")
        head_dim = head_dim_of(cfg, st)  # before hidden_size changes
    kept: dict = {}
    stats = {"before": before, "heads_mode": heads_mode, "multiple_of": multiple_of}

    if mlp_ratio > 0:
        width = before["intermediate_size"]
        n_keep = mlp_keep_count(width, mlp_ratio, multiple_of)
        if n_keep == width:
            raise ValueError(f"mlp_ratio={mlp_ratio} keeps all {width} channels after rounding to {multiple_of}")
        kept["mlp"] = []
        for i, layer in enumerate(layers):
            idx = top_indices(importance["mlp"][i], n_keep)
            for name in st.mlp_in:
                _keep_rows(_linear(layer, name), idx)
            _keep_cols(_linear(layer, st.mlp_out), idx)
            mlp = _parent(layer, st.mlp_out)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = n_keep
            kept["mlp"].append(idx.tolist())
        setattr(cfg, st.intermediate_key, n_keep)
        stats["mlp_ratio_effective"] = 1.0 - n_keep / width

    if heads_ratio > 0:
        n_heads, n_kv, hd = before["num_attention_heads"], before["num_key_value_heads"], before["head_dim"]
        kept["heads"], kept["kv_heads"] = [], []
        for i, layer in enumerate(layers):
            q_heads, kv_heads = head_plan(importance["heads"][i], n_heads, n_kv, new_heads, new_kv)
            q_idx, kv_idx = _channels(q_heads, hd), _channels(kv_heads, hd)
            _keep_rows(_linear(layer, st.q), q_idx)
            for name in st.kv:
                _keep_rows(_linear(layer, name), kv_idx)
            _keep_cols(_linear(layer, st.o), q_idx)
            attn = _parent(layer, st.q)
            if hasattr(attn, "num_key_value_groups"):
                attn.num_key_value_groups = new_heads // new_kv
            kept["heads"].append(q_heads)
            kept["kv_heads"].append(kv_heads)
        setattr(cfg, st.heads_key, new_heads)
        setattr(cfg, st.kv_heads_key, new_kv)
        setattr(cfg, st.head_dim_key, hd)  # hidden_size / num_attention_heads no longer gives it
        stats["heads_ratio_effective"] = 1.0 - new_heads / n_heads

    dropped: list[int] = []
    if drop_layers > 0:
        block = torch.as_tensor(importance["block"], dtype=torch.float64)
        dropped = sorted(torch.argsort(block, stable=True)[:drop_layers].tolist())
        keep = [i for i in range(n_layers) if i not in dropped]
        path = arch_of(model).layers
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.ModuleList([layers[i] for i in keep]))
        for j, i in enumerate(keep):
            for module in layers[i].modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = j
        setattr(cfg, st.layers_key, len(keep))
        layer_types = getattr(cfg, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == n_layers:
            cfg.layer_types = [layer_types[i] for i in keep]
        kept["layers"] = keep
    stats["dropped_layers"] = dropped

    if hidden_ratio > 0:  # after the drop: only kept layers are sliced
        idx = top_indices(importance["hidden"], n_hidden)
        scales = _prune_hidden(model, st, idx, importance.get("norm_energy"), kept.get("layers"))
        if scales:
            stats["norm_rescale"] = {"min": min(scales), "mean": sum(scales) / len(scales), "max": max(scales)}
        setattr(cfg, st.hidden_key, n_hidden)
        setattr(cfg, st.head_dim_key, head_dim)  # Llama would compute hidden_size // num_attention_heads
        kept["hidden"] = idx.tolist()
        stats["hidden_ratio_effective"] = 1.0 - n_hidden / before["hidden_size"]
    after = shape_of(model, st)
    stats["after"] = after
    stats["param_reduction"] = 1.0 - after["n_params"] / before["n_params"]
    stats["kept"] = kept
    return stats


def run(stage, model_dir, out_dir, ctx):
    """Recipe entry (config.StructuredPrune): importance search on calibration data, then slicing."""
    from frugalflow.method import MethodResult, float_model, layer_progress, save
    from frugalflow.prune.importance import structured_importance

    model, _ = float_model(model_dir, ctx["device"])
    importance = structured_importance(model, ctx["calib"](), device=ctx["device"],
                                       on_progress=layer_progress(ctx, "structured importance"))
    stats = prune_structured(model, importance, mlp_ratio=stage.mlp_ratio, heads_ratio=stage.heads_ratio,
                             hidden_ratio=stage.hidden_ratio, drop_layers=stage.drop_layers,
                             heads_mode=stage.heads_mode)
    save(model, out_dir, model_dir)
    return MethodResult({"structure": stats}, {"importance": importance})
