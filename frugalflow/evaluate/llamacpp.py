"""Run a GGUF file in llama.cpp, the engine it is for: load it, tokenize, generate, and score
token windows (perplexity as evaluate/perplexity.py computes it), and call llama.cpp's own tools
(llama-perplexity, llama-bench, llama-quantize, llama-imatrix).

llama.cpp is optional: `make llamacpp` builds llama-cpp-python and the tools from
requirements-llamacpp.lock into .venv/llamacpp (lib/ holds the binding, bin/ the tools);
LLAMACPP_HOME names another such folder. Nothing here is imported by the flow.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

DEFAULT_HOME = Path(__file__).resolve().parents[2] / ".venv" / "llamacpp"


class LlamaCppMissing(RuntimeError):
    """llama.cpp (binding or tools) is not installed where we look; the message says how to get it."""


def home() -> Path:
    return Path(os.environ.get("LLAMACPP_HOME", DEFAULT_HOME))


_LOG: deque[str] = deque(maxlen=200)  # llama.cpp's latest log lines: its reason for refusing a file is only there
_KEEP_LOG = None


def binding():
    """The llama_cpp module, from home()/lib, with llama.cpp's log kept in _LOG instead of printed."""
    global _KEEP_LOG
    lib = home() / "lib"
    if not (lib / "llama_cpp").is_dir():
        raise LlamaCppMissing(f"llama-cpp-python is not installed in {lib}: run `make llamacpp`")
    if str(lib) not in sys.path:
        sys.path.insert(0, str(lib))
    import llama_cpp

    if _KEEP_LOG is None:  # module-level, so the C side never calls a collected callback
        _KEEP_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: _LOG.append(
            text.decode(errors="replace")))
        llama_cpp.llama_log_set(_KEEP_LOG, None)
    return llama_cpp


def tool(name: str) -> Path:
    path = home() / "bin" / name
    if not os.access(path, os.X_OK):
        raise LlamaCppMissing(f"{path} is missing: run `make llamacpp`")
    return path


def run_tool(name: str, *args: str, timeout: float = 1800) -> str:
    """Run one of llama.cpp's tools; its stdout and stderr together (they log to stderr)."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(home() / "bin"))
    done = subprocess.run([str(tool(name)), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{name} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr


@contextmanager
def loaded(gguf_path: str | Path, n_ctx: int = 512, threads: int | None = None):
    """A llama_cpp.Llama for the file, with logits kept for every position; closed on exit.
    A file llama.cpp refuses raises ValueError carrying llama.cpp's own log lines. threads: default
    every core (llama.cpp's threads spin while they wait: give it fewer where other work runs)."""
    llama_cpp = binding()
    _LOG.clear()
    try:
        model = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, logits_all=True, n_threads=threads or os.cpu_count(),
                                n_batch=n_ctx, verbose=False)
    except ValueError as exc:
        raise ValueError(f"llama.cpp refused {gguf_path}: {''.join(_LOG)[-2000:]}") from exc
    try:
        yield model
    finally:
        model.close()


def tokenize(model, text: str) -> list[int]:
    """Token ids llama.cpp gives the text (no BOS, special tokens as text)."""
    return model.tokenize(text.encode(), add_bos=False, special=False)


def window_nll(model, window: list[int]) -> tuple[float, int]:
    """Summed next-token NLL and token count of one window scored from an empty context."""
    model.reset()
    model.eval(window)
    logits = torch.from_numpy(np.asarray(model.scores[:len(window) - 1], dtype=np.float32))
    targets = torch.tensor(window[1:])
    nll = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="sum")
    return float(nll), len(window) - 1


def perplexity(gguf_path: str | Path, windows: torch.Tensor, threads: int | None = None) -> float:
    """exp(mean next-token NLL) over token windows [N, L], each scored on its own, as
    frugalflow.evaluate.perplexity does for our runtime: the two differ only by the engine."""
    with loaded(gguf_path, n_ctx=windows.shape[1], threads=threads) as model:
        total, count = 0.0, 0
        for window in windows.tolist():
            nll, n = window_nll(model, window)
            total, count = total + nll, count + n
    return math.exp(total / count)


def generate(gguf_path: str | Path, prompt: str, max_tokens: int = 32, threads: int | None = None) -> str:
    """Greedy continuation of prompt, as llama.cpp's sampler gives it at temperature 0."""
    with loaded(gguf_path, threads=threads) as model:
        out = model(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]
