"""The runtime-format protocol every packed linear (pack.QuantLinear, int8.Int8Linear) follows,
the input embedding that reads its rows from a packed output head it is tied to, and the module
lookup and swap helpers.

A packed linear keeps in_features, out_features, bias and a `qweight` buffer, and answers
`dequantize(dtype)`, `storage_bits()`, `zero_count()` and `weight_grid()`; code outside the
formats (the exporters included) asks these instead of testing the module type.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class WeightGrid:
    """A packed linear's weight on its integer grid: W[:, group g] = scales[:, g] * (codes - zeros[:, g]),
    or scales * codes where `zeros` is None (signed codes). `group_size` -1: one group per row.
    `act`: the activation quantization applied at run time, None for weight-only formats, else
    {"mode": "dynamic" | "static", "scale": the static per-tensor input scale or None, "smoothed":
    whether a SmoothQuant vector divides the input first}."""

    codes: torch.Tensor  # [out, in]: uint8 in [0, 2^bits) with zeros, int8 without
    scales: torch.Tensor  # [out, n_groups]
    zeros: torch.Tensor | None  # [out, n_groups]
    bits: int
    group_size: int
    act: dict | None = None

    @property
    def group(self) -> int:
        """Weights per group (the row length for one group per row)."""
        return self.codes.shape[1] if self.group_size == -1 else self.group_size

    @property
    def symmetric(self) -> bool:
        """No offset to store: signed codes, or every zero point at 2^(bits-1)."""
        return self.zeros is None or bool((self.zeros == 2 ** (self.bits - 1)).all())


class PackedLinear(nn.Module):
    """Base of the packed runtime formats (see the module docstring for the shared API)."""

    in_features: int
    out_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def storage_bits(self) -> int:
        raise NotImplementedError

    def zero_count(self) -> int:
        """Weights stored as exactly zero (a pruned weight keeps this after quantization)."""
        raise NotImplementedError

    def weight_grid(self) -> WeightGrid:
        raise NotImplementedError

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An nn.Linear with the float32 dequantized weight (activation quantization dropped)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device, dtype=torch.float32)
        linear.weight.copy_(self.dequantize(torch.float32))
        if self.bias is not None:
            linear.bias.copy_(self.bias.float())
        return linear


class TiedEmbedding(nn.Module):
    """The input embedding of a model whose tied output head is packed: row i of the table is row i
    of the head's dequantized weight, looked up without dequantizing the rest. It holds no tensors
    of its own (the head's are stored once, under the head's name); its output takes the dtype of
    the model (a non-persistent empty buffer follows .to(dtype))."""

    def __init__(self, head: PackedLinear, padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: no second copy in state_dict
        self.num_embeddings, self.embedding_dim, self.padding_idx = head.out_features, head.in_features, padding_idx
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype, device=head.qweight.device), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the packed output head"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.dequantize_rows(ids.reshape(-1), self.dtype_probe.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def to_embedding(self, weight: nn.Parameter) -> nn.Embedding:
        """An nn.Embedding whose weight is `weight` (the dequantized head's: tied again)."""
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                 device=weight.device, dtype=weight.dtype)
        embedding.weight = weight
        return embedding


def tie_packed_head(model: nn.Module) -> bool:
    """If the model ties its input embedding to its output head and the head is packed, make the
    embedding a TiedEmbedding reading the head (called after the head is replaced). True if tied."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, PackedLinear) or not getattr(model.config, "tie_word_embeddings", False):
        return False
    old = model.get_input_embeddings()
    if isinstance(old, TiedEmbedding) and old.head is head:
        return True
    dtype = old.dtype_probe.dtype if isinstance(old, TiedEmbedding) else old.weight.dtype
    model.set_input_embeddings(TiedEmbedding(head, getattr(old, "padding_idx", None), dtype))
    return True


def module_name(model: nn.Module, module: nn.Module) -> str | None:
    """The dotted name of `module` inside `model` (None if it is not there)."""
    return next((n for n, m in model.named_modules() if m is module), None)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def packed_modules(model: nn.Module, kind: type[PackedLinear] = PackedLinear) -> dict[str, PackedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def dequantize_all(model: nn.Module, kind: type[PackedLinear] = PackedLinear,
                   only: set[str] | None = None) -> nn.Module:
    """In place: every packed linear (of `kind`; named in `only` if given) becomes an nn.Linear with
    float32 dequantized weights; an embedding tied to a packed head becomes an nn.Embedding tied to
    the dequantized head."""
    tied = {id(m.head): (name, m) for name, m in model.named_modules() if isinstance(m, TiedEmbedding)}
    for name, layer in packed_modules(model, kind).items():
        if only is not None and name not in only:
            continue
        linear = layer.to_linear()
        replace_module(model, name, linear)
        if id(layer) in tied:
            emb_name, emb = tied[id(layer)]
            replace_module(model, emb_name, emb.to_embedding(linear.weight))
    return model
