"""Greedy decode speed, prefill latency and peak memory of a causal LM.

`decode_speed` runs HF `generate` greedily with the end-of-sequence tokens forbidden, so exactly
`new_tokens` tokens are produced every time (checked). They are forbidden by writing -inf into
their logits; HF's own `min_new_tokens` does it by building a vocabulary-sized mask at every
step (arange + isin + where over 49k entries: about 3 ms a token on 2 cores, a tenth of a
135M model's decode step, timed as if it were the model's). A stopping criterion that never
stops timestamps each generated token: the first stamp closes prefill + first token, the
gaps between later stamps are the per-token decode latencies. Prefill is timed separately
as one forward of the prompt (or of `prefill_tokens` tokens: the prompt repeated), giving
prefill tokens/s. Only the model's forward is used, so models whose linears are custom
(packed) modules work, on the CPU or on CUDA.

`interleaved_decode_tps` times several models round by round, each once per round, so that a
noisy machine's slow spells hit all of them alike; it returns the median per model.

Memory (`peak_mem_mb`, MB = 2**20 bytes) is what the model needs at its peak while decoding:
- CUDA: torch.cuda.max_memory_allocated over the timed runs (weights, KV cache, activations;
  exact for tensors allocated through torch's caching allocator).
- CPU: the bytes of the model's parameters and buffers (exact) plus the peak increase of the
  process's resident set while generating (`work_mem_mb`: KV cache, activations, allocator
  slack), sampled at every generated token from /proc/self/statm and also taken from the
  process high-water mark (getrusage). The increase is a lower bound: memory the allocator
  reuses from earlier work does not show up in RSS. Both parts are reported as well.
"""
from __future__ import annotations

import os
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

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


class _NoEos(LogitsProcessor):
    """Sets the logits of the end-of-sequence ids to -inf at every step, in place."""

    def __init__(self, eos_ids: list[int]):
        self.eos_ids = eos_ids

    def __call__(self, input_ids, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.eos_ids:
            scores[:, self.eos_ids] = -float("inf")
        return scores


def _id_list(*values) -> list[int]:
    ids: list[int] = []
    for v in values:
        ids.extend(int(i) for i in (v if isinstance(v, (list, tuple)) else [v]) if i is not None)
    return sorted(set(ids))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied weights counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def prefill_ids(tokenizer, prompt: str, n_tokens: int) -> torch.Tensor:
    """[1, n] ids: the prompt's, or (n_tokens > 0) the prompt's repeated and cut to n_tokens."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if n_tokens > 0 and ids.shape[1] > 0:
        reps = -(-n_tokens // ids.shape[1])
        ids = ids.repeat(1, reps)[:, :n_tokens]
    return ids


def decode_speed(model: nn.Module, tokenizer, prompt: str, new_tokens: int = 64, repeats: int = 3,
                 prefill_tokens: int = 0) -> dict:
    """Greedy-decode `new_tokens` tokens after `prompt`, `repeats` times after one warm-up.

    Returns {'decode_tps': median over repeats of (new_tokens - 1) / decode time,
    'prefill_ms': median latency of one forward over the prefill ids (the prompt, or
    `prefill_tokens` tokens), 'prefill_tps': prefill tokens / that latency, 'latency_p50_ms' /
    'latency_p95_ms': per-token decode latency over all repeats, 'peak_mem_mb', 'weights_mem_mb',
    'work_mem_mb' (see the module docstring), 'new_tokens', 'prompt_tokens', 'prefill_tokens'}.
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
    pre_ids = prefill_ids(tokenizer, prompt, prefill_tokens).to(device)
    model_gen = getattr(model, "generation_config", None)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(model_gen, "eos_token_id", None)
    bos = getattr(model_gen, "bos_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if isinstance(pad, list):
        pad = pad[0]
    no_eos = LogitsProcessorList([_NoEos(_id_list(eos, getattr(model_gen, "eos_token_id", None)))])
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False,
                              num_beams=1, use_cache=True, pad_token_id=pad if pad is not None else 0,
                              eos_token_id=eos, bos_token_id=bos)

    def generate(clock: _TokenClock) -> torch.Tensor:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                              logits_processor=no_eos, stopping_criteria=StoppingCriteriaList([clock]))

    def prefill() -> None:
        model(input_ids=pre_ids, attention_mask=torch.ones_like(pre_ids), use_cache=True)

    weights_mb = model_bytes(model) / 2**20
    tps, prefill_s, latencies_ms, work = [], [], [], 0.0
    try:
        with torch.inference_mode():
            generate(_TokenClock(device))  # warm-up
            prefill()
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base_alloc = torch.cuda.memory_allocated(device)
            base_rss, base_maxrss = _rss_mb(), _maxrss_mb()
            for _ in range(repeats):
                _sync(device)
                t = time.perf_counter()
                prefill()
                _sync(device)
                prefill_s.append(time.perf_counter() - t)

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
                    work = max(work, max(clock.rss) - base_rss)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
                work = peak - base_alloc / 2**20
            else:
                work = max(work, _maxrss_mb() - base_maxrss, 0.0)
                peak = weights_mb + work
    finally:
        model.train(was_training)
    lat = np.asarray(latencies_ms)
    prefill_med = float(statistics.median(prefill_s))
    return {
        "decode_tps": float(statistics.median(tps)),
        "prefill_ms": prefill_med * 1e3,
        "prefill_tps": pre_ids.shape[1] / prefill_med,
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p95_ms": float(np.percentile(lat, 95)),
        "peak_mem_mb": float(peak),
        "weights_mem_mb": float(weights_mb),
        "work_mem_mb": float(work),
        "new_tokens": new_tokens,
        "prompt_tokens": int(input_ids.shape[1]),
        "prefill_tokens": int(pre_ids.shape[1]),
    }


def interleaved_decode_tps(models: dict[str, nn.Module], tokenizer, prompt: str, rounds: int,
                           new_tokens: int = 64) -> dict[str, float]:
    """Median decode tokens/s of each model over `rounds` rounds, every model once per round."""
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        for name, model in models.items():
            speeds[name].append(decode_speed(model, tokenizer, prompt, new_tokens=new_tokens, repeats=1)["decode_tps"])
        print(f"decode round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()), flush=True)
    return {name: statistics.median(v) for name, v in speeds.items()}
