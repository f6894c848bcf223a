"""Packed low-bit weight storage and the linear layer that computes with it.

Codes q (uint8, [out, in], values in [0, 2^bits - 1]) are stored as one dense
little-endian bitstream per row: code j of a row occupies bits j*bits .. j*bits+bits-1
of that row, bit 0 being the lowest bit of byte 0. For 8/4/2 bits this is one, two or
four codes per byte (low bits first); for 3/5/6/7 bits codes straddle bytes. Each row
takes ceil(in * bits / 8) bytes. The grid is rtn.py's: W ~ (q - zero) * scale.
Scales are float16 (or another float dtype), or log8: one byte per group, `scale_codes`, with one
per-layer integer `scale_offset`, scale = 2^((code + offset) / 16) (rtn.LOG8); `scales` reads the
decoded float32 values either way.

`QuantLinear.forward` picks, once per layer, the fastest path torch offers on the CPU:
  * 4 bits, group size a multiple of 32 (per-channel included) and out % 16 == 0:
    aten._weight_int4pack_mm_for_cpu on bf16 activations;
  * 8 bits per-channel: aten._weight_int8pack_mm (bf16) for short inputs (decode), with a
    rank-1 correction for zero points other than 128;
  * anything else: the weight dequantized once and cached in the activation dtype. That
    cache costs 2 (bf16) or 4 (fp32) bytes per weight in RAM on top of the packed codes:
    fast, but the in-memory saving is lost for those layers (disk size is unaffected).
The kernel paths compute in bfloat16 (the int4/int8 CPU kernels are 10x+ slower on fp32),
so fp32 inputs see bf16-level rounding; dequantize_model gives exact fp32 layers back.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugalflow.quant.rtn import LOG8, LOG8_STEPS, compute_qparams, dequantize, log8_codes, quantize
from frugalflow.quant.runtime import (
    PackedLinear,
    TiedEmbedding,
    WeightGrid,
    dequantize_all,
    module_name,
    packed_modules,
    replace_module,
    tie_packed_head,
)

KERNEL_DTYPE = torch.bfloat16
INT4_GROUPS = (256, 128, 64, 32)  # group sizes the int4 CPU kernel accepts
# measured on an H100 (torch 2.11): tinygemm int4 at 1 row beats bf16 from about 4096 x 4096 up
# (8192^2: 39 vs 49 us; 14336 x 4096: 29 vs 43 us) and loses below (576^2: 30 vs 21 us) and at 16 rows
INT4_CUDA_MIN_WEIGHTS = 4096 * 4096
INT4_CUDA_MAX_ROWS = 4
INT8_KERNEL_MAX_ROWS = 4  # measured: int8 kernel 2x faster than bf16 GEMM at 1 row, ~10x slower at 8
INT4_MM_CPU = torch.ops.aten._weight_int4pack_mm_for_cpu
INT4_MM_CUDA = torch.ops.aten._weight_int4pack_mm
INT8_MM = torch.ops.aten._weight_int8pack_mm


# --------------------------------------------------------------------------- packing
def packed_row_bytes(in_features: int, bits: int) -> int:
    return math.ceil(in_features * bits / 8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [out, in] -> uint8 [out, ceil(in * bits / 8)] (little-endian bitstream per row)."""
    _check_bits(bits)
    if q.dim() != 2 or q.dtype != torch.uint8:
        raise ValueError(f"expected 2-D uint8 codes, got {tuple(q.shape)} {q.dtype}")
    if q.numel() and int(q.max()) >= 2**bits:
        raise ValueError(f"code {int(q.max())} does not fit in {bits} bits")
    out_features, in_features = q.shape
    n_bytes = packed_row_bytes(in_features, bits)
    if bits == 8:
        return q.contiguous().clone()
    if 8 % bits == 0:  # 4 or 2 bits: whole codes per byte
        per = 8 // bits
        qp = F.pad(q, (0, n_bytes * per - in_features)).reshape(out_features, n_bytes, per)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
        return (qp << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: sum == or
    bit_idx = torch.arange(bits, dtype=torch.uint8, device=q.device)
    stream = ((q.unsqueeze(-1) >> bit_idx) & 1).reshape(out_features, in_features * bits)
    stream = F.pad(stream, (0, n_bytes * 8 - in_features * bits)).reshape(out_features, n_bytes, 8)
    return (stream << torch.arange(8, dtype=torch.uint8, device=q.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [out, n_bytes] -> uint8 codes [out, in_features]."""
    _check_bits(bits)
    out_features, n_bytes = packed.shape
    if packed.dtype != torch.uint8 or n_bytes != packed_row_bytes(in_features, bits):
        raise ValueError(f"packed {tuple(packed.shape)} {packed.dtype} does not hold {in_features} "
                         f"{bits}-bit codes per row ({packed_row_bytes(in_features, bits)} bytes expected)")
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        q = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return q.reshape(out_features, -1)[:, :in_features].contiguous()
    stream = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    stream = stream.reshape(out_features, n_bytes * 8)[:, :in_features * bits]
    stream = stream.reshape(out_features, in_features, bits)
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.uint8)
    return (stream * weights).sum(dim=-1, dtype=torch.uint8)


def kernel_matmul(path: str, x2: torch.Tensor, tensors: tuple) -> torch.Tensor:
    """x2 [rows, in] @ W.T in bf16 through the CPU integer kernel `path`: "int4" with
    (int4pack weight, scales and zeros, kernel group), "int8" with (int8 weight, scale, zero-point
    correction or None), as QuantLinear's _int4_tensors / _int8_tensors build them."""
    xk = x2.to(KERNEL_DTYPE).contiguous()
    if path == "int4":
        w_int4, scale_and_zeros, kg = tensors
        return INT4_MM_CPU(xk, w_int4, kg, scale_and_zeros)
    w_int8, scale, correction = tensors
    y = INT8_MM(xk, w_int8, scale)
    if correction is not None:
        y = (y.float() - x2.float().sum(-1, keepdim=True) * correction).to(KERNEL_DTYPE)
    return y


# --------------------------------------------------------------------------- the layer
class QuantLinear(PackedLinear):
    """y = x @ dequantize(qweight).T + bias, with qweight packed at `bits` per weight.

    Buffers: qweight uint8 packed codes, scales [out, n_groups] (fp16 by default; with `scale_dtype`
    "log8": scale_codes uint8 [out, n_groups] and scale_offset, the `scales` property decoding them),
    zeros uint8 [out, n_groups], optional bias. The weight is frozen (no gradients for it).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, scale_dtype: torch.dtype | str = torch.float16,
                 bias_dtype: torch.dtype = torch.float32, device=None, symmetric: bool | None = None):
        super().__init__()
        _check_bits(bits)
        g = in_features if group_size == -1 else group_size
        if g <= 0 or in_features % g:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        n_groups = in_features // g
        self.register_buffer("qweight", torch.zeros(out_features, packed_row_bytes(in_features, bits),
                                                    dtype=torch.uint8, device=device))
        scale_dtype = _scale_dtype(scale_dtype)
        if scale_dtype == LOG8:
            self.register_buffer("scale_codes", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
            self.register_buffer("scale_offset", torch.zeros((), dtype=torch.int32, device=device))
        else:
            self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self._cache: dict = {}
        self.siblings = None  # a fused.SiblingKernel shared with the linears reading the same input

    @property
    def scales(self) -> torch.Tensor:
        """[out, n_groups]: the stored float scales, or log8 codes decoded to float32."""
        if "scale_codes" in self._buffers:
            return torch.exp2((self.scale_codes.float() + self.scale_offset.float()) / LOG8_STEPS)
        if "scales" in self._buffers:
            return self._buffers["scales"]
        raise AttributeError("scales")  # before __init__ registers them

    @property
    def scale_format(self) -> str:
        """"log8" or the float scales' dtype name (quantization.json's scale_dtype)."""
        return LOG8 if "scale_codes" in self._buffers else str(self.scales.dtype).removeprefix("torch.")

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                   bias: torch.Tensor | None = None, scale_dtype: torch.dtype | str = torch.float16,
                   symmetric: bool | None = None) -> "QuantLinear":
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, scale_dtype=scale_dtype,
                    bias_dtype=bias.dtype if bias is not None else torch.float32, device=q.device,
                    symmetric=symmetric)
        if scale.shape != layer.zeros.shape or zero.shape != layer.zeros.shape:
            raise ValueError(f"scale {tuple(scale.shape)} / zero {tuple(zero.shape)} do not match "
                             f"{tuple(layer.scales.shape)} for q {tuple(q.shape)}, group_size {group_size}")
        zero_r = torch.round(zero.float())
        if (zero_r != zero.float()).any() or zero_r.min() < 0 or zero_r.max() >= 2**bits:
            raise ValueError(f"zero points must be integers in [0, {2**bits - 1}]")
        with torch.no_grad():
            layer.qweight.copy_(pack_codes(q.to(torch.uint8), bits))
            if layer.scale_format == LOG8:
                codes, offset = log8_codes(scale)
                layer.scale_codes.copy_(codes)
                layer.scale_offset.fill_(offset)
            else:
                layer.scales.copy_(scale)
            layer.zeros.copy_(zero_r.to(torch.uint8))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, path={self.kernel_path()}")

    # ---------------------------------------------------------------- views of the weight
    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.scales.float(), self.zeros.float(), self.group_size, dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `rows` (1-D indices) of the dequantized weight: a tied embedding's lookup."""
        q = unpack_codes(self.qweight[rows], self.bits, self.in_features)
        return dequantize(q, self.scales[rows].float(), self.zeros[rows].float(), self.group_size, dtype)

    def storage_bits(self) -> int:
        stored = [t for n, t in self._buffers.items() if n != "bias" and t is not None]
        return sum(t.numel() * t.element_size() * 8 for t in stored)

    def zero_count(self) -> int:
        g = self.in_features if self.group_size == -1 else self.group_size
        return int((self.codes() == self.zeros.repeat_interleave(g, dim=1)).sum())

    def weight_grid(self) -> WeightGrid:
        return WeightGrid(self.codes(), self.scales, self.zeros, self.bits, self.group_size)

    # ---------------------------------------------------------------- kernels
    def _group(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    def kernel_path(self, device_type: str = "cpu") -> str:
        g = self._group()
        if device_type == "cuda":  # tinygemm: n % 8, k % (16 * inner k tiles), groups 32..256
            ok = (self.bits == 4 and self.out_features % 8 == 0 and self.in_features % 32 == 0
                  and any(g % k == 0 for k in INT4_GROUPS))
            return "int4_cuda" if ok else "dequant"
        if self.bits == 4 and self.out_features % 16 == 0 and any(g % k == 0 for k in INT4_GROUPS):
            return "int4"
        if self.bits == 8 and g == self.in_features:
            return "int8"
        return "dequant"

    def invalidate_cache(self) -> None:
        self._cache = {}
        if getattr(self, "siblings", None) is not None:
            self.siblings.invalidate()

    @torch.no_grad()
    def int4_scale_and_zeros(self) -> tuple[torch.Tensor, int]:
        """(scales and zeros [groups, out, 2] in torch's int4pack form, the kernel's group size)."""
        g = self._group()
        kg = next(k for k in INT4_GROUPS if g % k == 0)  # repeat each group's params g // kg times
        scale = self.scales.float().repeat_interleave(g // kg, dim=1)
        zero = self.zeros.float().repeat_interleave(g // kg, dim=1)
        # torch int4pack: w = (q - 8) * scale + zero_f, so zero_f = (8 - zero) * scale for our grid.
        scale_and_zeros = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1)
        return scale_and_zeros.contiguous().to(KERNEL_DTYPE), kg

    @torch.no_grad()
    def _int4_tensors(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        if "int4" not in self._cache:
            w_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
            self._cache["int4"] = (w_int4, *self.int4_scale_and_zeros())
        return self._cache["int4"]

    @torch.no_grad()
    def _int4_cuda_tensors(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        if "int4_cuda" not in self._cache:
            tiles = 8 if self.in_features % 128 == 0 else (4 if self.in_features % 64 == 0 else 2)
            q = self.codes().to(torch.uint8)
            packed = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # [n, k / 2], high nibble first
            w_int4 = torch.ops.aten._convert_weight_to_int4pack(packed, tiles)
            self._cache["int4_cuda"] = (w_int4, *self.int4_scale_and_zeros())
        return self._cache["int4_cuda"]

    @torch.no_grad()
    def _int8_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if "int8" not in self._cache:
            w_int8 = (self.codes().to(torch.int16) - 128).to(torch.int8)
            scale = self.scales.float()[:, 0]
            shift = self.zeros.float()[:, 0] - 128  # W = (q - 128 - shift) * scale
            correction = None if bool((shift == 0).all()) else (shift * scale)
            self._cache["int8"] = (w_int8, scale.to(KERNEL_DTYPE), correction)
        return self._cache["int8"]

    @torch.no_grad()
    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        cached = self._cache.get("dense")
        if cached is None or cached[0] != dtype:  # one dtype only; the kernel tables and paths stay
            cached = self._cache["dense"] = (dtype, self.dequantize(dtype))
        return cached[1]

    def _path_for(self, x: torch.Tensor) -> str:
        """The kernel path for inputs like `x` (cached per device type; the cache empties on .to())."""
        device_type = x.device.type
        path = self._cache.get(device_type)
        if path is None:
            path = self.kernel_path(device_type) if device_type in ("cpu", "cuda") else "dequant"
            self._cache[device_type] = path
        return path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode calls this ~200 times per token: no decorators, no recomputed paths on the hot path
        if self.siblings is not None:
            y = self.siblings.output(self, x)
            if y is not None:
                return y
        dtype = x.dtype
        x2 = x.reshape(-1, self.in_features)
        path = self._path_for(x)
        if path == "int4":
            y = kernel_matmul(path, x2, self._cache.get("int4") or self._int4_tensors())
        elif path == "int8" and x2.shape[0] <= INT8_KERNEL_MAX_ROWS:
            y = kernel_matmul(path, x2, self._cache.get("int8") or self._int8_tensors())
        elif path == "int8":  # long inputs (prefill): dequantize on the fly, nothing cached
            y = F.linear(x2.to(KERNEL_DTYPE), self.dequantize(KERNEL_DTYPE))
        elif path == "int4_cuda" and x2.shape[0] <= INT4_CUDA_MAX_ROWS \
                and self.in_features * self.out_features >= INT4_CUDA_MIN_WEIGHTS:
            w_int4, scale_and_zeros, kg = self._int4_cuda_tensors()
            y = INT4_MM_CUDA(x2.to(KERNEL_DTYPE).contiguous(), w_int4, kg, scale_and_zeros)
        else:  # dequant, and int4_cuda for small layers / many rows (a cached bf16 copy is faster there)
            y = F.linear(x2, self._dense_weight(dtype))
        if y.dtype != dtype:
            y = y.to(dtype)
        bias = self._buffers["bias"]
        if bias is not None:
            y = y + bias.to(dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    # ---------------------------------------------------------------- keep the cache honest
    def _apply(self, fn, recurse=True):
        scales = self._buffers.get("scales")
        if scales is not None:
            self._buffers["scales"] = None  # .to(dtype) must not round the stored scales
        try:
            super()._apply(fn, recurse)
        finally:
            if scales is not None:
                self._buffers["scales"] = scales.to(self.qweight.device)
        self.invalidate_cache()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self.invalidate_cache()
        super()._load_from_state_dict(*args, **kwargs)


# --------------------------------------------------------------------------- model level
def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return packed_modules(model, QuantLinear)


def _scale_dtype(scale_dtype: torch.dtype | str) -> torch.dtype | str:
    """A scale storage: LOG8, or a float dtype (torch's, or its name as quantization.json writes it)."""
    if scale_dtype == LOG8 or isinstance(scale_dtype, torch.dtype):
        return scale_dtype
    dtype = getattr(torch, str(scale_dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"scale_dtype {scale_dtype!r}: expected {LOG8!r} or a float dtype such as 'float16'")
    return dtype


def quantize_model(model: nn.Module, qparams: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   bits: int, group_size: int, scale_dtype: torch.dtype | str = torch.float16,
                   symmetric: bool | None = None) -> nn.Module:
    """In place: every named nn.Linear becomes a QuantLinear holding its (q, scale, zero); an input
    embedding tied to a head quantized here reads the head's codes (runtime.TiedEmbedding).
    `scale_dtype` LOG8 needs scales on the log8 grid (rtn.compute_qparams with a log8_offset)."""
    for name, (q, scale, zero) in qparams.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantize_model: no module named {name!r}") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantize_model: {name!r} is a {type(linear).__name__}, not an nn.Linear")
        if tuple(q.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"quantize_model: codes for {name!r} have shape {tuple(q.shape)}, layer is "
                             f"{(linear.out_features, linear.in_features)}")
        layer = QuantLinear.from_codes(q.to(linear.weight.device), scale, zero, bits, group_size,
                                       bias=linear.bias, scale_dtype=scale_dtype, symmetric=symmetric)
        replace_module(model, name, layer)
    tie_packed_head(model)
    return model


def quantize_head(model: nn.Module, bits: int = 8) -> str:
    """In place: the output head on a symmetric per-row grid of `bits` (8: the int8 decode kernel, no
    zero-point term), its tied input embedding reading the same codes. Returns the head's name."""
    head = model.get_output_embeddings()
    name = module_name(model, head)
    if not isinstance(head, nn.Linear) or name is None:
        raise ValueError(f"the model's output head is a {type(head).__name__}, not an nn.Linear")
    W = head.weight.detach().float()
    scale, zero = compute_qparams(W, bits, -1, True)
    quantize_model(model, {name: (quantize(W, scale, zero, bits, -1), scale, zero)}, bits, -1, symmetric=True)
    return name


def quantize_layers(model: nn.Module, qparams: dict[str, tuple], grid: tuple[int, int, bool],
                    layer_grids: dict[int, tuple[int, int, bool]], scale_dtype: torch.dtype | str = torch.float16
                    ) -> nn.Module:
    """quantize_model with a (bits, group_size, symmetric) per decoder layer: `grid` unless `layer_grids`
    names it. `scale_dtype` is `grid`'s; the layer_grids' scales are float16."""
    from frugalflow.arch import arch_of

    prefix = arch_of(model).layers + "."
    by_grid: dict[tuple, dict] = {}
    for name, codes in qparams.items():
        index = int(name[len(prefix):].split(".")[0])
        key = (*layer_grids[index], torch.float16) if index in layer_grids else (*grid, scale_dtype)
        by_grid.setdefault(key, {})[name] = codes
    for (bits, group_size, symmetric, storage), part in by_grid.items():
        quantize_model(model, part, bits, group_size, scale_dtype=storage, symmetric=symmetric)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """In place: every QuantLinear becomes an nn.Linear with float32 dequantized weights."""
    return dequantize_all(model, QuantLinear)


def quantization_meta(model: nn.Module) -> dict:
    """What is quantized, as plain JSON data (written as quantization.json)."""
    layers = quantized_modules(model)
    modules = {name: {"bits": m.bits, "group_size": m.group_size, "in_features": m.in_features,
                      "out_features": m.out_features, "bias": m.bias is not None,
                      "scale_dtype": m.scale_format, "symmetric": m.symmetric}
               for name, m in layers.items()}

    def common(key):  # the value every module shares, else None
        values = {repr(v[key]) for v in modules.values()}
        return next(iter(modules.values()))[key] if len(values) == 1 else None

    return {"format": "frugalflow-packed", "version": 1,
            "packing": "little-endian bitstream per row; W = (q - zero) * scale, groups along in_features",
            "bits": common("bits") if modules else None,
            "group_size": common("group_size") if modules else None,
            "symmetric": common("symmetric") if modules else None,
            "modules": modules,
            "tied_embedding": next((n for n, m in model.named_modules() if isinstance(m, TiedEmbedding)), None)}
