"""The runtime-format protocol every packed linear (pack.QuantLinear, int8.Int8Linear) follows,
and the one module-swap helper.

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


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def packed_modules(model: nn.Module, kind: type[PackedLinear] = PackedLinear) -> dict[str, PackedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def dequantize_all(model: nn.Module, kind: type[PackedLinear] = PackedLinear) -> nn.Module:
    """In place: every packed linear (of `kind`) becomes an nn.Linear with float32 dequantized weights."""
    for name, layer in packed_modules(model, kind).items():
        replace_module(model, name, layer.to_linear())
    return model
