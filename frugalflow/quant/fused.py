"""Packed linears that read one input (a layer's q/k/v, its gate/up) computed by one kernel call.

Decode calls each linear with a single row, where a call's fixed cost rivals its arithmetic:
SmolLM2 makes 210 such calls per token. `fuse_siblings` links each decoder layer's sibling
QuantLinears (calibration.input_groups: the linears arch.smooth feeds from one norm) that share a
kernel (int4, or int8 for short inputs) and a grid; the first sibling called with an input runs
the kernel on the concatenated weights and keeps the output until each sibling has taken its
columns. Every output column is the same dot product the sibling's own call computes (tested
bit for bit). Nothing stored changes: the members keep their buffers and state dict.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from frugalflow.quant.pack import INT8_KERNEL_MAX_ROWS, QuantLinear, kernel_matmul

FUSABLE_PATHS = ("int4", "int8")


class SiblingKernel:
    """One kernel over the concatenated weights of `members` (same input, grid and kernel path)."""

    def __init__(self, members: list[QuantLinear]):
        self.members = members
        self.path = members[0].kernel_path("cpu")
        ends = torch.tensor([m.out_features for m in members]).cumsum(0).tolist()
        self.bounds = list(zip([0, *ends[:-1]], ends))  # each member's columns of the fused output
        self._tensors = None
        self._last = None  # (input, its version, output, members yet to take their columns)

    def invalidate(self) -> None:
        self._tensors, self._last = None, None

    @torch.no_grad()
    def _build(self) -> tuple:
        if self.path == "int4":
            codes = torch.cat([m.codes() for m in self.members]).to(torch.int32)
            w_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            parts = [m.int4_scale_and_zeros() for m in self.members]
            return w_int4, torch.cat([p[0] for p in parts], dim=1), parts[0][1]
        parts = [m._int8_tensors() for m in self.members]
        for m in self.members:
            m.invalidate_cache()
        corrections = [p[2] if p[2] is not None else torch.zeros_like(p[1], dtype=torch.float32) for p in parts]
        correction = None if all(p[2] is None for p in parts) else torch.cat(corrections)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), correction

    def output(self, member: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
        """`member`'s output for `x`, or None where the fused kernel does not apply (the member's own)."""
        x2 = x.reshape(-1, member.in_features)
        rows = x2.shape[0]
        if x.device.type != "cpu" or x.requires_grad or (self.path == "int8" and rows > INT8_KERNEL_MAX_ROWS):
            return None
        index = next(i for i, m in enumerate(self.members) if m is member)
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        last = self._last
        if last is None or last[0] is not x or last[1] != version or index not in last[3]:
            tensors = self._tensors
            if tensors is None:
                tensors = self._tensors = self._build()
            y = kernel_matmul(self.path, x2, tensors)
            last = self._last = (x, version, y, set(range(len(self.members))))
        waiting = last[3]
        waiting.discard(index)
        if not waiting:
            self._last = None  # every sibling has its columns: hold no activations between calls
        a, b = self.bounds[index]
        out = last[2][:, a:b]
        if rows > 1:
            out = out.contiguous()
        out = out.to(x.dtype)
        if member.bias is not None:
            out = out + member.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], b - a)


def fuse_siblings(model: nn.Module) -> int:
    """In place: link each decoder layer's sibling QuantLinears that can share a kernel call.
    Returns the number of groups linked (0 for an architecture arch.py does not know)."""
    from frugalflow.arch import arch_of
    from frugalflow.calibration import input_groups

    try:
        arch = arch_of(model)
    except ValueError:
        return 0
    linked = 0
    for layer in model.get_submodule(arch.layers):
        for names in input_groups(arch):
            members = [layer.get_submodule(n) for n in names if _has(layer, n)]
            if len(members) < 2 or not all(isinstance(m, QuantLinear) for m in members):
                continue
            first = members[0]
            key = (first.in_features, first.bits, first.group_size, first.kernel_path("cpu"))
            if key[3] not in FUSABLE_PATHS or any(
                    (m.in_features, m.bits, m.group_size, m.kernel_path("cpu")) != key for m in members):
                continue
            kernel = SiblingKernel(members)
            for m in members:
                m.siblings = kernel
            linked += 1
    return linked


def _has(layer: nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
    except AttributeError:
        return False
    return True
