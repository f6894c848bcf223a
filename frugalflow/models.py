"""Model I/O: load and save dense or packed-quantized causal LMs, and measure them.

A dense directory is a plain Hugging Face one (config.json + safetensors). A quantized
directory adds `quantization.json` (see quant.pack.quantization_meta; int8 W8A8 modules,
quant.int8, are entries of kind "int8") and holds ONE `model.safetensors` with each
QuantLinear's packed buffers (qweight, scales, zeros, bias), each Int8Linear's (qweight,
scales, act_scale, bias) and every other tensor (fp16 by default). Tied weights are stored once. Saving writes into
a sibling temporary directory and renames it into place, so out_dir is either absent,
the old model, or the complete new one.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import struct
import threading
import uuid
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from frugalflow.arch import compressible_linears
from frugalflow.errors import BadInput, CorruptData
from frugalflow.fetch_model import declare_fast_tokenizer
from frugalflow.quant import int8
from frugalflow.quant.fused import fuse_siblings
from frugalflow.quant.pack import QuantLinear, quantization_meta, quantized_modules
from frugalflow.quant.runtime import PackedLinear, module_name, packed_modules, tie_packed_head

try:
    from transformers.modeling_utils import no_init_weights
except ImportError:  # other transformers versions: fall back to a (slower) random init
    no_init_weights = contextlib.nullcontext

QUANT_META = "quantization.json"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
_PACKED_BUFFERS = ("qweight", "scales", "zeros")


class ModelLoadError(CorruptData):
    """A model directory whose files are damaged or inconsistent (exit code 3); the message names
    the path and the problem."""


class ModelNotFound(BadInput, ModelLoadError):
    """A model directory that does not exist or holds no model (exit code 2)."""


# --------------------------------------------------------------------------- checks
def _check_safetensors(path: Path) -> None:
    """Header parses and the data section is exactly as long as the header says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            if size < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise ValueError(f"header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        expected = 8 + n + max(ends, default=0)
        if expected != size:
            raise ValueError(f"tensors need {expected} bytes but the file has {size} (truncated?)")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file: {exc}") from None


def _check_dir(model_dir: Path) -> list[Path]:
    if not model_dir.is_dir():
        raise ModelNotFound(f"{model_dir}: model directory does not exist")
    if not (model_dir / "config.json").is_file():
        raise ModelNotFound(f"{model_dir}: no config.json")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights and not list(model_dir.glob("pytorch_model*.bin")):
        raise ModelNotFound(f"{model_dir}: no weights (*.safetensors or pytorch_model*.bin)")
    for path in weights:
        _check_safetensors(path)
    return weights


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied weights): (kept, {alias: kept name})."""
    seen: dict[tuple, str] = {}
    kept, aliases = {}, {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = t
    return kept, aliases


def _names(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------- loading
# transformers builds models under process-wide patches (meta-device init): two threads loading at
# once (sweep candidates in a thread-pool task runner) corrupt each other's parameters.
_LOADING = threading.Lock()


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A dense or packed-quantized model from `model_dir`, in eval mode."""
    model_dir = Path(model_dir)
    weights = _check_dir(model_dir)
    with _LOADING:
        if (model_dir / QUANT_META).is_file():
            model = _load_quantized(model_dir, weights, dtype)
        else:
            model = _load_dense(model_dir, dtype)
    return model.to(device).eval()


def _load_dense(model_dir: Path, dtype: torch.dtype) -> PreTrainedModel:
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
    except Exception as exc:  # transformers raises many kinds; keep the cause
        raise ModelLoadError(f"{model_dir}: cannot load model: {exc}") from exc
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            keys = [k if isinstance(k, str) else k[0] for k in info[kind]]
            raise ModelLoadError(f"{model_dir}: {kind.replace('_', ' ')} in the weights: {_names(keys)}")
    return model


def _load_quantized(model_dir: Path, weights: list[Path], dtype: torch.dtype) -> PreTrainedModel:
    try:
        meta = json.loads((model_dir / QUANT_META).read_text())
        modules = meta["modules"]
        if not isinstance(modules, dict):
            raise TypeError("'modules' must map module names to their settings")
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{model_dir / QUANT_META}: not a valid quantization description ({exc})") from None
    if not weights:
        raise ModelLoadError(f"{model_dir}: a quantized model needs *.safetensors weights")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{model_dir / 'config.json'}: cannot read config: {exc}") from exc
    with no_init_weights():  # every tensor is overwritten below; skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips tying
    for name, spec in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"{model_dir / QUANT_META}: module {name!r} does not exist in the model") from None
        try:
            shape = (spec["in_features"], spec["out_features"])
            if spec.get("kind", "packed") == "int8":
                layer = int8.Int8Linear(*shape, spec["mode"], bias=spec["bias"], bias_dtype=dtype,
                                        scale_dtype=getattr(torch, spec["scale_dtype"]),
                                        smooth=spec.get("smooth", False))
            else:
                layer = QuantLinear(*shape, spec["bits"], spec["group_size"], bias=spec["bias"],
                                    scale_dtype=spec.get("scale_dtype", "float16"),
                                    bias_dtype=dtype, symmetric=spec.get("symmetric"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"{model_dir / QUANT_META}: bad settings for {name!r}: {exc!r}") from None
        if not isinstance(linear, nn.Linear) or (linear.in_features, linear.out_features) != shape:
            raise ModelLoadError(f"{model_dir / QUANT_META}: module {name!r} is not a linear of shape "
                                 f"{shape[1]}x{shape[0]}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    tied = meta.get("tied_embedding")
    if tied is not None and (tied != module_name(model, model.get_input_embeddings()) or not tie_packed_head(model)):
        raise ModelLoadError(f"{model_dir / QUANT_META}: tied_embedding {tied!r} is not the input embedding of a "
                             "model whose tied output head is quantized")

    state: dict[str, torch.Tensor] = {}
    for path in weights:
        try:
            part = load_file(path)
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot read safetensors: {exc}") from None
        if dup := set(part) & set(state):
            raise ModelLoadError(f"{path}: tensors stored twice: {_names(dup)}")
        state.update(part)
    expected, aliases = _dedupe(model.state_dict())
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing:
        raise ModelLoadError(f"{model_dir}: missing tensors: {_names(missing)}")
    if unexpected:
        raise ModelLoadError(f"{model_dir}: unexpected tensors: {_names(unexpected)}")
    for name, spec in modules.items():
        codes = {"qweight": torch.int8} if spec.get("kind") == "int8" else {"qweight": torch.uint8,
                                                                            "zeros": torch.uint8}
        for buf, code_dtype in codes.items():
            t = state[f"{name}.{buf}"]
            if t.dtype != code_dtype:
                raise ModelLoadError(f"{model_dir}: {name}.{buf} is {t.dtype}, expected {code_dtype}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ModelLoadError(f"{model_dir}: {name} has shape {tuple(t.shape)}, model expects "
                                 f"{tuple(expected[name].shape)}")
    result = model.load_state_dict(state, strict=False)
    if set(result.missing_keys) - set(aliases) or result.unexpected_keys:
        raise ModelLoadError(f"{model_dir}: state dict mismatch: {result}")
    if getattr(config, "tie_word_embeddings", False) and tied is None:
        model.tie_weights()
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    fuse_siblings(model)
    return model


def load_tokenizer(model_dir: str | Path):
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelNotFound(f"{model_dir}: tokenizer directory does not exist")
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{model_dir}: cannot load tokenizer: {exc}") from exc


# --------------------------------------------------------------------------- saving
def save_model(model: PreTrainedModel, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
               float_dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write `model` (dense or with QuantLinear layers) to out_dir atomically.

    float_dtype: dtype for the non-quantized float tensors; default: the model's own for
    dense models, float16 for quantized ones. Raises FileExistsError if out_dir exists and
    overwrite is False.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if packed_modules(model):
            _save_quantized(model, tmp, float_dtype or torch.float16)
        else:
            state = None
            if float_dtype is not None:
                state = {k: v.to(float_dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
        _fsync_tree(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _save_quantized(model: PreTrainedModel, tmp: Path, float_dtype: torch.dtype) -> None:
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # our format is described by quantization.json
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(tmp)
    meta = quantization_meta(model)
    meta["modules"].update(int8.int8_meta(model))
    meta["float_dtype"] = str(float_dtype).removeprefix("torch.")
    (tmp / QUANT_META).write_text(json.dumps(meta, indent=2) + "\n")
    packed = {f"{name}.{buf}" for name in quantized_modules(model) for buf in _PACKED_BUFFERS}
    packed |= {f"{name}.{buf}" for name in int8.int8_modules(model) for buf in int8.BUFFERS}
    state, _ = _dedupe(model.state_dict())
    out = {}
    for name, t in state.items():
        if name not in packed and t.is_floating_point():
            t = t.to(float_dtype)
        out[name] = t.detach().cpu().contiguous()
    save_file(out, tmp / WEIGHTS, metadata={"format": "pt"})


def _copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    found = [tokenizer_dir / f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    if not found:
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    for path in found:
        shutil.copy2(path, dest / path.name)
    declare_fast_tokenizer(dest)


def _fsync_tree(root: Path) -> None:
    for path in root.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- measuring
def weights_size_mb(model_dir: str | Path) -> float:
    """Bytes of the *.safetensors files in model_dir, in MB (1e6)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) / 1e6


@torch.no_grad()
def model_stats(model: nn.Module) -> dict[str, float]:
    """sparsity: share of exactly-zero weights over the compressible linears (a QuantLinear
    code equal to its zero point counts as zero); bits_per_weight: stored bits per
    compressible-linear weight, scale/zero overhead included; n_params: logical parameters
    (a QuantLinear counts out*in (+bias) however it is stored). An Int8Linear counts like a
    QuantLinear, code 0 being its zero."""
    zeros = bits = weights = 0
    for layer in compressible_linears(model).values():
        if isinstance(layer, PackedLinear):
            zeros += layer.zero_count()
            bits += layer.storage_bits()
            weights += layer.in_features * layer.out_features
        else:
            W = layer.weight
            zeros += int((W == 0).sum())
            bits += W.numel() * W.element_size() * 8
            weights += W.numel()
    n_params = sum(p.numel() for p in model.parameters())
    for layer in packed_modules(model).values():
        n_params += layer.in_features * layer.out_features + (layer.bias.numel() if layer.bias is not None else 0)
    return {"sparsity": zeros / max(weights, 1), "bits_per_weight": bits / max(weights, 1),
            "n_params": n_params, "n_compressible_weights": weights}
