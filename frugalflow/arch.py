"""Per-architecture facts as data: where the decoder layers are, which linear layers each
holds, and which norm or linear feeds which (for scale folding in AWQ).

Every algorithm asks this table instead of checking model classes. Add a family by
adding a row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass(frozen=True)
class Smooth:
    """`prev` (a norm or linear, relative to the layer) feeds the linears in `linears`."""

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Structure:
    """What structured (width/depth) pruning slices, relative to one decoder layer, and the config
    keys the sizes live in. Attention fields stay empty where heads cannot be pruned without
    custom code (OPT derives head_dim from hidden_size / num_attention_heads); `norms` stays
    empty where embedding channels (hidden size) cannot be pruned."""

    mlp_in: tuple[str, ...]  # linears whose output rows are the MLP channels (gate, up)
    mlp_out: str  # linear whose input columns are the MLP channels (down)
    intermediate_key: str  # config key of the MLP width
    q: str = ""  # query projection: rows are num_attention_heads * head_dim
    kv: tuple[str, ...] = ()  # key and value projections: rows are num_key_value_heads * head_dim
    o: str = ""  # attention output projection: columns are num_attention_heads * head_dim
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    head_dim_key: str = "head_dim"
    layers_key: str = "num_hidden_layers"
    norms: tuple[str, ...] = ()  # norms whose outputs feed a block (hidden-channel importance; sliced with it)
    hidden_key: str = "hidden_size"


@dataclass(frozen=True)
class Arch:
    layers: str  # dotted path from the model to the ModuleList of decoder layers
    embed: str  # token embedding, relative to the model
    final_norm: str
    linears: tuple[str, ...]  # compressible linears, relative to one decoder layer, in execution order
    smooth: tuple[Smooth, ...] = field(default=())
    pre_layers: tuple[str, ...] = ()  # modules that run before the first layer besides embed (e.g. OPT positions)
    structure: Structure | None = None  # for prune/importance.py and prune/structured.py; None: not supported


_LLAMA = Arch(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    smooth=(
        Smooth("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Smooth("self_attn.v_proj", ("self_attn.o_proj",)),
        Smooth("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Smooth("mlp.up_proj", ("mlp.down_proj",)),
    ),
    pre_layers=("model.rotary_emb",),
    structure=Structure(mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
                        intermediate_key="intermediate_size", q="self_attn.q_proj",
                        kv=("self_attn.k_proj", "self_attn.v_proj"), o="self_attn.o_proj",
                        norms=("input_layernorm", "post_attention_layernorm")),
)

_OPT = Arch(
    layers="model.decoder.layers",
    embed="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    smooth=(
        Smooth("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Smooth("self_attn.v_proj", ("self_attn.out_proj",)),
        Smooth("final_layer_norm", ("fc1",)),
    ),
    pre_layers=("model.decoder.embed_positions",),
    structure=Structure(mlp_in=("fc1",), mlp_out="fc2", intermediate_key="ffn_dim"),
)

# model_type (config.json) -> architecture row. SmolLM models are model_type "llama".
ARCHS: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "opt": _OPT,
}


def arch_of(model: nn.Module) -> Arch:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model).layers)


def compressible_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Full dotted name -> module, for every compressible linear in every decoder layer."""
    arch = arch_of(model)
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name in arch.linears:
            out[f"{arch.layers}.{i}.{name}"] = layer.get_submodule(name)
    return out
