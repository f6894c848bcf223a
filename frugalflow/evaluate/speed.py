"""Greedy decode speed, prefill latency and peak memory of a causal LM.

`decode_speed` runs HF `generate` greedily with min_new_tokens = max_new_tokens, so exactly
`new_tokens` tokens are produced every time (checked). A stopping criterion that never
stops timestamps each generated token: the first stamp closes prefill + first token, the
gaps between later stamps are the per-token decode latencies. Prefill is timed separately
as one forward of the prompt. Only the model's forward is used, so models whose linears
are custom (packed) modules work. Memory: CUDA max allocated above the starting point,
else the peak resident-set increase seen while generating (RSS sampled at every token,
plus the process high-water mark).
"""
from __future__ import annotations

import os
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from frugalflow.evaluate.perplexity import model_device


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class _TokenClock(StoppingCriteria):
    """Never stops generation; records a timestamp (and RSS) after every generated token."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []
        self.rss: list[float] = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        rss = _rss_mb()
        if rss is not None:
            self.rss.append(rss)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_speed(model: nn.Module, tokenizer, prompt: str, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Greedy-decode `new_tokens` tokens after `prompt`, `repeats` times after one warm-up.

    Returns {'decode_tps': median over repeats of (new_tokens - 1) / decode time,
    'prefill_ms': median prompt-forward latency, 'latency_p50_ms' / 'latency_p95_ms':
    per-token decode latency over all repeats, 'peak_mem_mb', 'new_tokens', 'prompt_tokens'}.
    With new_tokens == 1 there is no decode gap: tps and latency use the whole generate call."""
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"new_tokens and repeats must be >= 1, got {new_tokens}, {repeats}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    enc = tokenizer(prompt, return_tensors="pt")
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc.get("attention_mask", torch.ones_like(enc["input_ids"])).to(device)
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt encodes to zero tokens")
    model_gen = getattr(model, "generation_config", None)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(model_gen, "eos_token_id", None)
    bos = getattr(model_gen, "bos_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if isinstance(pad, list):
        pad = pad[0]
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              num_beams=1, use_cache=True, pad_token_id=pad if pad is not None else 0,
                              eos_token_id=eos, bos_token_id=bos)

    def generate(clock: _TokenClock) -> torch.Tensor:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                              stopping_criteria=StoppingCriteriaList([clock]))

    tps, prefill_ms, latencies_ms, peak = [], [], [], 0.0
    try:
        with torch.inference_mode():
            generate(_TokenClock(device))  # warm-up
            if device.type == "cuda":
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base_alloc = torch.cuda.memory_allocated(device)
            base_rss, base_maxrss = _rss_mb(), _maxrss_mb()
            for _ in range(repeats):
                _sync(device)
                t = time.perf_counter()
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
                _sync(device)
                prefill_ms.append((time.perf_counter() - t) * 1e3)

                clock = _TokenClock(device)
                t_start = time.perf_counter()
                out = generate(clock)
                produced = out.shape[1] - input_ids.shape[1]
                if produced != new_tokens or len(clock.stamps) != new_tokens:
                    raise RuntimeError(f"generate produced {produced} tokens ({len(clock.stamps)} steps), "
                                       f"expected exactly {new_tokens}")
                if new_tokens > 1:
                    gaps = np.diff(np.asarray(clock.stamps))
                    tps.append((new_tokens - 1) / float(gaps.sum()))
                    latencies_ms.extend((gaps * 1e3).tolist())
                else:
                    total = clock.stamps[0] - t_start
                    tps.append(1.0 / total)
                    latencies_ms.append(total * 1e3)
                if base_rss is not None and clock.rss:
                    peak = max(peak, max(clock.rss) - base_rss)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20
            else:
                peak = max(peak, _maxrss_mb() - base_maxrss, 0.0)
    finally:
        model.train(was_training)
    lat = np.asarray(latencies_ms)
    return {
        "decode_tps": float(statistics.median(tps)),
        "prefill_ms": float(statistics.median(prefill_ms)),
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p95_ms": float(np.percentile(lat, 95)),
        "peak_mem_mb": float(peak),
        "new_tokens": new_tokens,
        "prompt_tokens": int(input_ids.shape[1]),
    }
