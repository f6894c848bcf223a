"""One llm-compressor one-shot run, for benchmarks/reference.py: run with the reference's own Python
(a separate environment with llmcompressor installed), never imported by frugalflow.

    REFERENCE_PYTHON benchmarks/llmcompressor_run.py --model DIR --calib FILE --method gptq|awq|awq_gptq \
        --group-size 64 --out FILE

Calibrates on the given windows (a safetensors file with `windows`, [n, seq] token ids), quantizes
every decoder linear to 4-bit integers, asymmetric, in groups of `--group-size` (the output head is
left as it is, llm-compressor's default), and writes the dequantized weights (safetensors, the
model's own parameter names) and the seconds the `oneshot` call took (JSON on stdout).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def scheme(group_size: int) -> dict:
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group_size)
    return {"config_groups": {"w4": QuantizationScheme(targets=["Linear"], weights=weights)}, "ignore": ["lm_head"]}


def recipe(method: str, group_size: int) -> list:
    if method == "gptq":
        return [GPTQModifier(**scheme(group_size))]
    if method == "awq":
        return [AWQModifier(), QuantizationModifier(**scheme(group_size))]
    if method == "awq_gptq":
        return [AWQModifier(), GPTQModifier(**scheme(group_size))]
    raise SystemExit(f"unknown method {method!r}: gptq, awq or awq_gptq")


def dequantized_state(model) -> dict[str, torch.Tensor]:
    """Every parameter as the quantized model computes with it (weights fake-quantized to their grid)."""
    from compressed_tensors.quantization import forward_quantize

    state = {}
    for name, module in model.named_modules():
        scheme_ = getattr(module, "quantization_scheme", None)
        if scheme_ is not None and scheme_.weights is not None and hasattr(module, "weight_scale"):
            state[f"{name}.weight"] = forward_quantize(module, module.weight.detach(), "weight",
                                                       scheme_.weights).float().contiguous()
    for name, param in model.named_parameters():
        if name.endswith(".weight") and name not in state:  # norms, embedding (weight_scale etc. are skipped)
            state[name] = param.detach().float().contiguous()
    return state


def cpu_only_workaround() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations unconditionally, which raises on a host
    without an accelerator ("Cannot access accelerator device"); pinning only speeds host-to-device
    copies, so on such a host it is skipped (numerics unchanged)."""
    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def main() -> None:
    cpu_only_workaround()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    windows = load_file(args.calib)["windows"]
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe(args.method, args.group_size),
            num_calibration_samples=len(windows), max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    state = dequantized_state(model)
    save_file(state, args.out)
    import llmcompressor

    print(json.dumps({"method": args.method, "seconds": round(seconds, 1), "tensors": len(state),
                      "llmcompressor": llmcompressor.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
