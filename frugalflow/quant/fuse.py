"""Inference-time fusion of the packed linears of a decoder layer that read the same input (q/k/v,
gate/up): their rows concatenated into one QuantLinear, so one kernel call serves the group.

Each member is replaced by a FusedMember that returns its slice of the group's output. The group
computes when its first member is called and keeps the result for the others only while they are
called with that very input tensor, unchanged (same object, same version counter; under
torch.inference_mode, which keeps no version counters, the same object); any other call computes
again, so the output is the unfused one whatever the call order. At decode a 135M model
is dominated by per-call overhead, which is what this removes (benchmarks/results/domains.md).

For evaluation and serving only: a fused model keeps no per-member buffers, so it is neither saved
nor trained (load the model again for that).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from frugalflow.arch import arch_of, decoder_layers
from frugalflow.calibration import input_groups
from frugalflow.quant.pack import QuantLinear


class FusedGroup(nn.Module):
    """One QuantLinear holding the members' rows; `output(x, i)` is member i's slice of fused(x)."""

    def __init__(self, fused: QuantLinear, sizes: list[int]):
        super().__init__()
        self.fused, self.sizes = fused, sizes
        self._input, self._version, self._outputs = None, -1, None

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        if index == 0 or x is not self._input or version != self._version:
            self._outputs = self.fused(x).split(self.sizes, dim=-1)
            self._input, self._version = x, version
        return self._outputs[index]


class FusedMember(nn.Module):
    def __init__(self, group: FusedGroup, index: int):
        super().__init__()
        self.__dict__["group"] = group  # registered once, on the layer
        self.index, self.out_features = index, group.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)


def _fusable(members: list[nn.Module]) -> bool:
    if len(members) < 2 or not all(isinstance(m, QuantLinear) and m.bias is None for m in members):
        return False
    first = members[0]
    return all((m.bits, m.group_size, m.in_features, m.scales.dtype, m.qweight.device)
               == (first.bits, first.group_size, first.in_features, first.scales.dtype, first.qweight.device)
               for m in members)


@torch.no_grad()
def fuse_shared_inputs(model: nn.Module) -> int:
    """In place: every group of packed linears with one input and one grid becomes one kernel call.
    Returns the number of groups fused."""
    groups = [g for g in input_groups(arch_of(model)) if len(g) > 1]
    fused = 0
    for layer in decoder_layers(model):
        for names in groups:
            members = [layer.get_submodule(n) for n in names]
            if not _fusable(members):
                continue
            first = members[0]
            one = QuantLinear(first.in_features, sum(m.out_features for m in members), first.bits, first.group_size,
                              scale_dtype=first.scales.dtype, device=first.qweight.device, symmetric=first.symmetric)
            for buf in ("qweight", "scales", "zeros"):
                getattr(one, buf).copy_(torch.cat([getattr(m, buf) for m in members]))
            group = FusedGroup(one, [m.out_features for m in members])
            layer.add_module("fused_" + "_".join(n.rpartition(".")[2].removesuffix("_proj") for n in names), group)
            for index, name in enumerate(names):
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, FusedMember(group, index))
            fused += 1
    return fused
