"""Weight quantization that streams the model: one decoder layer in host memory at a time.

`stream_quantize(model_dir, out_dir, method, ...)` ("rtn" or "gptq") builds the model with every
parameter on the meta device (buffers such as rotary frequencies are real), reads tensors one by
one from the safetensors shards (`safe_open`), and materializes only the embedding and the
modules before the first layer to capture that layer's inputs (then frees them). Each decoder
layer is then loaded in float32, compressed with the calibration activations carried from the
previous layer (`calibration.calibrate_layer`, the step `run_sequential` takes; RTN needs no
activations), run again to give the next layer's inputs, packed, written as its own shard and
freed. The tensors outside the layers are copied one at a time. Host memory holds about one
layer in float32, the calibration activations and the method's statistics (GPTQ: the layer's
Hessians), whatever the number of layers; GPTQ frees each solved linear's float weight and
rebuilds it only while that linear runs to give the next layer's inputs. The output directory is what the in-memory stage
writes (`models.load_model` reads it; tests/test_streaming.py checks the two are equal),
except that it is split into shards (`model-<part>.safetensors` plus an index).
"""
from __future__ import annotations

import copy
import gc
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from frugalflow.arch import arch_of, decoder_layers
from frugalflow.calibration import _activation_store, _to, calibrate_layer, capture_inputs
from frugalflow.method import ERROR_KEY, MethodResult, layer_progress
from frugalflow.models import QUANT_META, ModelLoadError, _check_dir, _copy_tokenizer, _fsync_tree, _swap_into_place
from frugalflow.quant import pack, rtn

METHODS = ("rtn", "gptq")


class ShardReader:
    """Tensor name -> shard file for a model directory; reads one tensor at a time, its file
    opened only while that tensor is copied out (the memory map is released after every tensor)."""

    def __init__(self, model_dir: Path):
        self.where: dict[str, Path] = {}
        for path in _check_dir(model_dir):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in self.where:
                        raise ModelLoadError(f"{path}: tensor {name} is also in {self.where[name]}")
                    self.where[name] = path

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.where]
        if missing:
            raise ModelLoadError(f"{next(iter(self.where.values())).parent}: missing tensors {missing[:4]}")
        out: dict[str, torch.Tensor] = {}
        for n in names:  # the file is mapped only while one tensor is copied out of it
            with safe_open(str(self.where[n]), framework="pt") as f:
                t = f.get_tensor(n)
            out[n] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
            del t
        return out


def _skeleton(model_dir: Path) -> nn.Module:
    """The model with parameters on the meta device and real buffers, float32."""
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    config.dtype = torch.float32  # computed in float32, as models.load_model loads it
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # a tied output embedding is the input one (stored once)
    return model.eval()


def _materialize(module: nn.Module, prefix: str, reader: ShardReader, as_stored: tuple[str, ...] = ()) -> None:
    """Load `module`'s parameters and persistent buffers in place of its meta tensors: float32, except
    the tensors named in `as_stored`, kept in their checkpoint dtype."""
    names = list(module.state_dict(keep_vars=True))
    tensors = reader.read([prefix + n for n in names if n not in as_stored], torch.float32)
    tensors.update(reader.read([prefix + n for n in names if n in as_stored]))
    module.load_state_dict({n: tensors[prefix + n] for n in names}, strict=True, assign=True)
    meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if meta:
        raise ModelLoadError(f"{prefix or 'model'}: tensors not in the checkpoint: {meta[:4]}")


def _outside_layers(model: nn.Module, layers_prefix: str) -> list[str]:
    """State-dict names outside the decoder layers, each tied tensor once (its first name)."""
    seen, names = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(layers_prefix) or id(t) in seen:
            continue
        seen.add(id(t))
        names.append(name)
    return names


def _float_on_call(lin: nn.Linear, make: Callable[[], torch.Tensor], rest: Callable[[], torch.Tensor]) -> list:
    """`lin` computes with the float32 weight `make()` builds for each call and holds `rest()` between
    calls, so that one linear's float32 weight is in memory at a time, not the layer's. Returns the hooks."""

    def build(module, _args):
        module.weight.data = make()

    def drop(module, _args, _out):
        module.weight.data = rest()

    return [lin.register_forward_pre_hook(build), lin.register_forward_hook(drop)]


def _rtn_solve(bits: int, group_size: int, symmetric: bool, arch, qparams: dict):
    def solve(i, layer, stats):
        out = {}
        for name in arch.linears:
            W = layer.get_submodule(name).weight.data
            scale, zero = rtn.compute_qparams(W, bits, group_size, symmetric)
            q = rtn.quantize(W, scale, zero, bits, group_size)
            W_q = rtn.dequantize(q, scale, zero, group_size)
            out[name] = {ERROR_KEY: float((W - W_q).norm() / W.norm().clamp(min=1e-12))}
            qparams[f"{arch.layers}.{i}.{name}"] = (q, scale, zero)
        return out
    return solve


@torch.no_grad()
def stream_quantize(model_dir: str | Path, out_dir: str | Path, method: str, calib_windows: torch.Tensor | None,
                    *, bits: int, group_size: int, symmetric: bool, act_order: bool = False,
                    dampening: float = 0.01, blocksize: int = 128, clip_search: bool = False, batch_size: int = 8,
                    device: str | torch.device = "cpu", float_dtype: torch.dtype = torch.float16,
                    tokenizer_dir: str | Path | None = None, layers: int | None = None,
                    autocast: torch.dtype | None = None, propagate: bool = True,
                    on_progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Quantize the dense model in `model_dir` into `out_dir` (written atomically), one decoder layer
    in memory at a time. `method` "rtn" (no calibration) or "gptq" (needs `calib_windows` [N, L]).
    `layers`: compress (and write) only the first n layers, then discard the output (for timing).
    `autocast`: the dtype of the calibration forwards, `propagate` False: GPTQ calibrates every layer on the
    float model's activations (calibration.run_sequential).
    on_progress(i, n_layers, {"seconds": ..}) after each layer. Returns {"layers": per-linear stats,
    "seconds_per_layer": [...]}."""
    if method not in METHODS:
        raise ValueError(f"streaming method must be one of {', '.join(METHODS)}, got {method!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if (model_dir / QUANT_META).is_file():
        raise ValueError(f"{model_dir}: already quantized ({QUANT_META}); streaming reads dense models only")
    if method == "gptq" and (calib_windows is None or calib_windows.dim() != 2 or len(calib_windows) == 0):
        raise ValueError("gptq needs calibration windows: a non-empty [N, L] tensor")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    device = torch.device(device)
    reader = ShardReader(model_dir)
    model = _skeleton(model_dir)
    arch = arch_of(model)
    blocks = decoder_layers(model)
    n_layers = len(blocks)
    outside = _outside_layers(model, arch.layers + ".")  # before loading anything breaks the ties
    qparams: dict[str, tuple] = {}
    if method == "gptq":
        from frugalflow.quant.gptq import gptq_solver

        gptq = gptq_solver(arch, bits, group_size, symmetric, qparams, act_order=act_order, dampening=dampening,
                           blocksize=blocksize, clip_search=clip_search, release=True)

        def solve(i, layer, stats):  # solved weights are freed, then rebuilt one linear at a time for a call
            for hook in upcasts:  # the solver reads the stored weights (and copies them to float32 one by one)
                hook.remove()
            out = gptq(i, layer, stats)
            for name in arch.linears:
                q, scale, zero = qparams[f"{arch.layers}.{i}.{name}"]
                _float_on_call(layer.get_submodule(name),
                               lambda q=q, scale=scale, zero=zero: rtn.dequantize(q, scale, zero, group_size).to(device),
                               lambda: torch.empty(0, device=device))
            return out
    else:
        solve = _rtn_solve(bits, group_size, symmetric, arch, qparams)

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        weight_map: dict[str, str] = {}
        modules_meta: dict[str, dict] = {}
        result: dict[str, dict] = {}
        per_layer: list[float] = []
        inputs = extras = None
        store = device
        upcasts: list = []
        # GPTQ holds the linears' weights as stored (bf16 in large checkpoints: half of float32) and
        # computes with a float32 copy of one linear at a time
        held_as_stored = tuple(f"{n}.weight" for n in arch.linears) if method == "gptq" else ()
        if method == "gptq":  # the first layer's inputs, from the embedding (and pre-layer modules) alone
            front = [arch.embed, *arch.pre_layers]
            for name in front:
                mod = model.get_submodule(name)
                if any(True for _ in mod.parameters()):
                    _materialize(mod, name + ".", reader)
            _materialize(blocks[0], f"{arch.layers}.0.", reader, held_as_stored)
            hidden = blocks[0].get_submodule(arch.linears[0]).in_features
            store = _activation_store(device, calib_windows, hidden, torch.float32)
            inputs, extras = capture_inputs(model, calib_windows, device, batch_size, store)
            extras = [_to(e, device) for e in extras]
            for name in front:
                model.get_submodule(name).to("meta")
            gc.collect()
        last = n_layers if layers is None else min(layers, n_layers)
        for i in range(last):
            t0 = time.perf_counter()
            layer = blocks[i]
            prefix = f"{arch.layers}.{i}."
            if any(p.is_meta for p in layer.parameters()):
                _materialize(layer, prefix, reader, held_as_stored)
            layer.to(device)
            if method == "gptq":
                upcasts = []
                for name in arch.linears:
                    stored = layer.get_submodule(name).weight.data
                    upcasts += _float_on_call(layer.get_submodule(name), lambda w=stored: w.float(), lambda w=stored: w)
                solved, inputs = calibrate_layer(i, layer, arch, inputs, extras, solve, ("H",), None, device, store,
                                                 propagate and i + 1 < n_layers, 1, autocast)
            else:
                solved = solve(i, layer, {})
            layer.to("cpu")
            result.update({prefix + k: v for k, v in solved.items()})
            mine = {k[len(prefix):]: v for k, v in qparams.items() if k.startswith(prefix)}
            for k in mine:
                del qparams[prefix + k]
            # as the in-memory stages pack: GPTQ records `symmetric`, RTN (rtn.run) does not
            pack.quantize_model(layer, mine, bits, group_size, symmetric=symmetric if method == "gptq" else None)
            meta = pack.quantization_meta(layer)
            modules_meta.update({prefix + k: v for k, v in meta["modules"].items()})
            packed = {f"{n}.{b}" for n in pack.quantized_modules(layer) for b in ("qweight", "scales", "zeros")}
            state = {prefix + k: (t if k in packed or not t.is_floating_point() else t.to(float_dtype))
                     .detach().contiguous() for k, t in layer.state_dict().items()}
            shard = f"model-layer{i:05d}.safetensors"
            save_file(state, tmp / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(state, shard))
            del state
            layer.to("meta")
            del layer, mine
            gc.collect()
            per_layer.append(time.perf_counter() - t0)
            if on_progress is not None:
                on_progress(i, n_layers, {"seconds": per_layer[-1]})
        if layers is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return {"layers": result, "seconds_per_layer": per_layer}
        for name in outside:  # one tensor in memory at a time
            t = reader.read([name], torch.float32)[name]
            t = t.to(float_dtype) if t.is_floating_point() else t
            shard = f"model-{name.replace('.', '_')}.safetensors"
            save_file({name: t.contiguous()}, tmp / shard, metadata={"format": "pt"})
            weight_map[name] = shard
            del t
        _write_metadata(model, model_dir, tmp, modules_meta, float_dtype, weight_map, tokenizer_dir)
        _fsync_tree(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"layers": result, "seconds_per_layer": per_layer}


def _write_metadata(model, model_dir: Path, tmp: Path, modules: dict, float_dtype, weight_map: dict,
                    tokenizer_dir) -> None:
    """config.json, generation_config.json, quantization.json and the shard index, as models.save_model
    writes them for a quantized model."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(tmp)
    if (model_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(model_dir).save_pretrained(tmp)
    elif getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(tmp)
    fake = nn.Module()  # quantization_meta's shared fields come from the per-module entries
    meta = pack.quantization_meta(fake)
    values = list(modules.values())
    for key in ("bits", "group_size", "symmetric"):
        meta[key] = values[0][key] if values and len({repr(v[key]) for v in values}) == 1 else None
    meta["modules"] = modules
    meta["float_dtype"] = str(float_dtype).removeprefix("torch.")
    (tmp / QUANT_META).write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                 indent=1) + "\n")
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), tmp)


def run_streaming(stage, model_dir: Path, out_dir: Path, ctx: dict) -> MethodResult:
    """The recipe entries of RTN and GPTQ with `stream: true`: the same output as in memory."""
    from frugalflow.quant.gptq import autocast_dtype

    progress = layer_progress(ctx, f"{stage.method} (streaming)")
    stats = stream_quantize(model_dir, out_dir, stage.method, ctx["calib"]() if stage.method == "gptq" else None,
                            bits=stage.bits, group_size=stage.group_size, symmetric=stage.symmetric,
                            act_order=getattr(stage, "act_order", False), dampening=getattr(stage, "dampening", 0.01),
                            blocksize=getattr(stage, "blocksize", 128), clip_search=getattr(stage, "clip_search", False),
                            device=ctx["device"], tokenizer_dir=model_dir, autocast=autocast_dtype(stage),
                            propagate=getattr(stage, "propagate", True),
                            on_progress=lambda i, n, info: progress(i, n))
    return MethodResult({"layers": stats["layers"], "seconds_per_layer": stats["seconds_per_layer"]})
