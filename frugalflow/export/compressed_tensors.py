"""Export a packed Llama-family model directory as a compressed-tensors checkpoint (what vLLM and
transformers' compressed-tensors quantizer read).

The directory holds config.json with `quantization_config` (quant_method "compressed-tensors",
status "compressed"), one model.safetensors and the tokenizer files. Our grid
W = (q - zero) * scale, q in [0, 2^b), maps exactly onto compressed-tensors' signed one
W = (q_s - zp_s) * scale with q_s = q - 2^(b-1), zp_s = zero - 2^(b-1):
  * QuantLinear, b in {2, 4, 8} -> "pack-quantized": `weight_packed` int32 [out, in*b/32]
    (32/b codes per word, element i at bits i*b, stored as q_s + 2^(b-1) = q), `weight_scale`
    [out, n_groups] (fp16, as we store it), `weight_shape` int64 [2], and, unless every zero is
    2^(b-1) (symmetric: zp_s = 0), `weight_zero_point` int32 packed the same way along the
    OUTPUT dim [out*b/32, n_groups]. Strategy "group" (group_size g) or "channel" (g = in).
    vLLM serves 4 and 8 bits (WNA16); 3/5/6/7 bits are left out because the library's packing
    of widths that do not divide 32 changed across versions.
  * Int8Linear without smoothing -> "int-quantized" W8A8: `weight` int8, `weight_scale` [out, 1],
    input activations int8 symmetric, per token dynamic or per tensor static (`input_scale`).
    The weights are exact; activation rounding is the server's (compressed-tensors' own
    reference divides max|x| by 127.5 where Int8Linear divides by 127).
Other layers are written dense (fp16 by default) and listed in `ignore`; require_exact=True
refuses a quantized layer that would be written that way. A model with no quantized layer is
refused: its plain HF directory already is what serving stacks read.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from frugalflow.export.common import (
    ExportError,
    dense_weight,
    describe_fallback,
    linears,
    load_for_export,
    write_atomically,
)
from frugalflow.fetch_model import declare_fast_tokenizer
from frugalflow.models import TOKENIZER_FILES, _dedupe
from frugalflow.quant.pack import pack_codes
from frugalflow.quant.runtime import PackedLinear

PACKED_BITS = (2, 4, 8)


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, cols] -> int32 [rows, ceil(cols * bits / 32)]: a dense little-endian
    bitstream per row read as 32-bit words (compressed-tensors' pack_to_int32 layout)."""
    packed = pack_codes(q.to(torch.uint8).contiguous(), bits).numpy()
    pad = (-packed.shape[1]) % 4
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return torch.from_numpy(np.ascontiguousarray(packed).view("<i4").astype(np.int32))


def scheme_of(layer: nn.Module) -> tuple[dict | None, str]:
    """(compressed-tensors scheme {weights, input_activations, format}, or None; why not)."""
    if isinstance(layer, nn.Linear):
        return None, "dense layer"
    grid = layer.weight_grid()
    if grid.act is not None:  # W8A8: signed 8-bit codes per row, inputs quantized at run time
        if grid.act["smoothed"]:
            return None, "SmoothQuant-smoothed int8: the smoothing has no compressed-tensors counterpart"
        dynamic = grid.act["mode"] == "dynamic"
        act = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "dynamic": dynamic,
               "strategy": "token" if dynamic else "tensor"}
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
                   "dynamic": False}
        return {"weights": weights, "input_activations": act, "format": "int-quantized"}, ""
    if grid.bits not in PACKED_BITS:
        return None, f"{grid.bits}-bit codes: exported for 2, 4 and 8 bits only"
    weights = {"num_bits": grid.bits, "type": "int", "symmetric": grid.symmetric,
               "group_size": None if grid.group_size == -1 else grid.group_size,
               "strategy": "channel" if grid.group_size == -1 else "group", "dynamic": False}
    return {"weights": weights, "input_activations": None, "format": "pack-quantized"}, ""


def module_tensors(name: str, layer: nn.Module, scheme: dict) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear."""
    grid = layer.weight_grid()
    if scheme["format"] == "int-quantized":
        out = {f"{name}.weight": grid.codes.clone(), f"{name}.weight_scale": grid.scales.clone()}
        if grid.act["scale"] is not None:
            out[f"{name}.input_scale"] = grid.act["scale"].float().reshape(1).clone()
    else:
        out = {f"{name}.weight_packed": pack_int32(grid.codes, grid.bits),
               f"{name}.weight_scale": grid.scales.clone(),
               f"{name}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
        if not scheme["weights"]["symmetric"]:
            out[f"{name}.weight_zero_point"] = pack_int32(grid.zeros.t(), grid.bits).t().contiguous()
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().clone()
    return out


def quantization_config(schemes: dict[str, dict], other_linears: list[str]) -> dict:
    """config.json's quantization_config: one config group per distinct scheme."""
    groups: dict[str, dict] = {}
    for name, scheme in schemes.items():
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {**copy.deepcopy(scheme), "output_activations": None, "targets": []})
        groups[key]["targets"].append(name)
    if len(groups) == 1:  # the usual case: every compressible linear, by class
        next(iter(groups.values()))["targets"] = ["Linear"]
    formats = {g["format"] for g in groups.values()}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "kv_cache_scheme": None, "global_compression_ratio": None,
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
            "ignore": sorted(other_linears)}


def export_compressed_tensors(model_dir: str | Path, out_dir: str | Path, float_dtype: torch.dtype = torch.float16,
                              require_exact: bool = False, tokenizer_dir: str | Path | None = None,
                              overwrite: bool = False) -> dict:
    """Write model_dir (packed Llama) as a compressed-tensors directory; returns a summary:
    formats (format -> layer count), fallback ({layer: reason}), ignore, bytes."""
    model_dir = Path(model_dir)
    model = load_for_export(model_dir)
    plan = {name: scheme_of(layer) for name, layer in linears(model).items()}
    schemes = {name: s for name, (s, _) in plan.items() if s is not None}
    fallback = {name: why for name, (s, why) in plan.items() if s is None and why != "dense layer"}
    if not schemes:
        raise ExportError(f"{model_dir}: no quantized layer compressed-tensors can describe"
                          + (f" ({describe_fallback(fallback)})" if fallback else "")
                          + "; a dense model is served from its plain HF directory")
    if require_exact and fallback:
        raise ExportError(f"no exact compressed-tensors scheme: {describe_fallback(fallback)}")
    all_linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, PackedLinear))]
    qconfig = quantization_config(schemes, [n for n in all_linears if n not in schemes])

    def write(tmp: Path) -> None:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.quantization_config = qconfig
        config.dtype = float_dtype
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        out: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        state, _ = _dedupe(model.state_dict())
        for name, scheme in schemes.items():
            out.update(module_tensors(name, modules[name], scheme))
        for key, t in state.items():
            module_name = key.rpartition(".")[0]
            if module_name in schemes:
                continue  # written above
            elif module_name in plan and isinstance(modules[module_name], PackedLinear):
                if key == f"{module_name}.qweight":  # a fallback: one dense weight (+ bias)
                    out[f"{module_name}.weight"] = dense_weight(modules[module_name]).to(float_dtype)
                elif key == f"{module_name}.bias":
                    out[key] = t.to(float_dtype)
            else:
                out[key] = t.to(float_dtype) if t.is_floating_point() else t
        save_file({k: v.detach().cpu().contiguous() for k, v in out.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir or model_dir) / fname
            if src.is_file():
                shutil.copy2(src, tmp / fname)
        declare_fast_tokenizer(tmp)

    write_atomically(Path(out_dir), write, is_dir=True, overwrite=overwrite, keep=(model_dir,))
    formats: dict[str, int] = {}
    for s in schemes.values():
        formats[s["format"]] = formats.get(s["format"], 0) + 1
    return {"format": "compressed-tensors", "path": str(out_dir), "formats": formats, "fallback": fallback,
            "ignore": qconfig["ignore"], "bytes": (Path(out_dir) / "model.safetensors").stat().st_size}
