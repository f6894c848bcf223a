"""Activation importance for structured pruning (Minitron; Muralidharan et al. 2024): the search
half of `frugalflow.prune.structured`, whose result is a small JSON-able dict.

`structured_importance(model, windows)` runs the shared sequential driver
(`calibration.run_sequential`) over the windows, changing no weight, and records per layer
  "mlp"    importance of MLP channel j from the activation a entering the down projection
           (act(gate x) * up x for Llama): mean |a_j| over the tokens of each window, then the
           L2 norm over windows (Minitron's best (batch L2, sequence mean) aggregation);
  "heads"  importance of each query head: the same per channel on the input of the attention
           output projection, then the L2 norm over the head's head_dim channels;
  "block"  block importance BI = 1 - mean over tokens of cos(layer input, layer output)
           (Men et al. 2024, ShortGPT);
and model-wide
  "hidden" importance of embedding channel c: the same per channel on the output of every norm
           that feeds a block (input_layernorm, post_attention_layernorm), summed over all of them;
  "norm_energy" per channel, the sum over tokens of x^2 at the input of every block norm and of
           the final norm (the residual stream there), for the RMSNorm rescale below.
Why the driver: it moves one layer at a time to `device` and feeds each layer the output of
the one before (propagate=False: no weight changes, so the first run's outputs are exactly a
plain forward's), and its `accumulate` hook hands over the down/o projection inputs; forward
hooks on the norms see their outputs as each layer runs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugalflow.arch import Structure, arch_of, decoder_layers
from frugalflow.calibration import run_sequential

AGGREGATION = ("mean |x| over each window's tokens, L2 over windows; heads: L2 over head_dim; "
               "hidden: sum over the block-input norms")


def structure_of(model: nn.Module) -> Structure:
    arch = arch_of(model)
    if arch.structure is None:
        raise ValueError(f"structured pruning is not described for model_type {model.config.model_type!r}")
    return arch.structure


def head_dim_of(config, st: Structure) -> int:
    return getattr(config, st.head_dim_key, None) or config.hidden_size // getattr(config, st.heads_key)


def shape_of(model: nn.Module, st: Structure) -> dict:
    cfg = model.config
    out = {"n_params": sum(p.numel() for p in model.parameters()),
           "hidden_size": getattr(cfg, st.hidden_key),
           "num_hidden_layers": getattr(cfg, st.layers_key),
           "intermediate_size": getattr(cfg, st.intermediate_key)}
    if st.q:
        out.update(num_attention_heads=getattr(cfg, st.heads_key), num_key_value_heads=getattr(cfg, st.kv_heads_key),
                   head_dim=head_dim_of(cfg, st))
    return out


class _ChannelScore:
    """Per channel: mean |x| over each window's tokens, squared and summed over windows."""

    def __init__(self):
        self.sq = None

    def add(self, x: torch.Tensor) -> None:
        x = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
        s = x.float().abs().mean(dim=1).pow(2).sum(dim=0)
        self.sq = s if self.sq is None else self.sq + s

    def finish(self) -> torch.Tensor:
        return self.sq.sqrt().cpu()


@torch.no_grad()
def structured_importance(model: nn.Module, calib_windows: torch.Tensor, device: str | torch.device = "cpu",
                          on_progress: Callable[[int, int], None] | None = None, batch_size: int = 8) -> dict:
    """Per-layer MLP channel, head and block importance and model-wide embedding-channel
    ("hidden") importance on `calib_windows` (LongTensor [N, L]), as plain lists
    (json.dumps-able). Weights are not changed."""
    st = structure_of(model)
    cfg = model.config
    layers = decoder_layers(model)
    shape = shape_of(model, st)
    current: dict = {}
    per_layer: list[dict] = []
    model_wide: dict = {}  # "hidden": running sum over layers and norms of the channel scores

    def accumulate(name, inp, _out):
        if name == st.mlp_out:
            current.setdefault("mlp", _ChannelScore()).add(inp)
        elif st.o and name == st.o:
            current.setdefault("heads", _ChannelScore()).add(inp)

    def block(_module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        y = out[0] if isinstance(out, (tuple, list)) else out
        cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
        current["cos"] = current.get("cos", 0.0) + float(cos.double().sum())
        current["tokens"] = current.get("tokens", 0) + cos.numel()
        if st.norms and len(per_layer) == len(layers) - 1:  # the last layer's output enters the final norm
            add_energy("final_energy", y)

    def norm_out(name):
        return lambda _module, _args, out: current.setdefault(("norm", name), _ChannelScore()).add(out)

    def add_energy(key, x: torch.Tensor) -> None:
        e = x.detach().float().pow(2).reshape(-1, x.shape[-1]).sum(0)
        current[key] = current[key] + e if key in current else e

    def norm_in(name):
        return lambda _module, args: add_energy(("energy", name), args[0])

    def solve(i, _layer, _stats):
        if len(per_layer) != i:
            raise RuntimeError(f"layer {i} finished out of order")
        if st.norms:
            scores = sum(current[("norm", name)].finish() for name in st.norms)
            model_wide["hidden"] = model_wide.get("hidden", 0) + scores
            model_wide.setdefault("energy", []).append([current[("energy", name)].cpu().tolist() for name in st.norms])
            if "final_energy" in current:
                model_wide["final_energy"] = current["final_energy"].cpu().tolist()
        row = {"mlp": current["mlp"].finish().tolist(), "block": 1.0 - current["cos"] / current["tokens"]}
        if st.o:
            ch = current["heads"].finish()
            row["heads"] = ch.reshape(shape["num_attention_heads"], -1).norm(dim=1).tolist()
        per_layer.append(row)
        current.clear()
        return {}

    handles = [layer.register_forward_hook(block, with_kwargs=True) for layer in layers]
    handles += [layer.get_submodule(name).register_forward_hook(norm_out(name)) for layer in layers
                for name in st.norms]
    handles += [layer.get_submodule(name).register_forward_pre_hook(norm_in(name)) for layer in layers
                for name in st.norms]
    try:
        run_sequential(model, calib_windows, solve, needs=(), accumulate=accumulate, device=device,
                       batch_size=batch_size, propagate=False, on_progress=on_progress)
    finally:
        for h in handles:
            h.remove()
    return {
        "method": "minitron-activation", "aggregation": AGGREGATION, "model_type": cfg.model_type,
        "hidden_size": shape["hidden_size"], "n_layers": shape["num_hidden_layers"],
        "intermediate_size": shape["intermediate_size"],
        "num_attention_heads": shape.get("num_attention_heads"), "num_key_value_heads": shape.get("num_key_value_heads"),
        "head_dim": shape.get("head_dim"),
        "n_windows": int(calib_windows.shape[0]), "n_tokens": int(calib_windows.numel()),
        "mlp": [r["mlp"] for r in per_layer],
        "heads": [r["heads"] for r in per_layer] if st.o else None,
        "block": [r["block"] for r in per_layer],
        "hidden": model_wide["hidden"].tolist() if st.norms else None,
        "norm_energy": {"layers": model_wide["energy"], "final": model_wide["final_energy"]} if st.norms else None,
    }


# --------------------------------------------------------------------------- planning
