"""The pyfunc's model code, logged as an MLflow models-from-code file (tasks/pyfunc.py logs it):
greedy completion with a frugalflow model directory (artifact `model_dir`). Loading the
model runs this file; it imports MLflow, numpy, pandas and the bundled `frugalflow`, never
this repository's `tasks` or `flows`.
"""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

DEFAULT_NEW_TOKENS = 32
MAX_NEW_TOKENS = 512  # a request can't hold a server worker for longer than this


def _new_tokens(value, default: int) -> int:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return default
    n = int(value)
    if not 1 <= n <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {n}")
    return n


def as_requests(model_input, default_new_tokens: int) -> list[tuple[str, int]]:
    """(prompt, max_new_tokens) per row of a DataFrame with a `prompt` column (and an optional
    `max_new_tokens` column), or per string of a str / list / Series / 1-d array."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input if isinstance(model_input.get("prompt"), (list, tuple))
                                   else [model_input])
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise ValueError(f"input needs a 'prompt' column, got columns {list(model_input.columns)}")
        counts = (model_input["max_new_tokens"] if "max_new_tokens" in model_input.columns
                  else [None] * len(model_input))
        prompts = list(model_input["prompt"])
    else:
        if isinstance(model_input, str):
            model_input = [model_input]
        prompts = list(np.asarray(model_input, dtype=object).reshape(-1))
        counts = [None] * len(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {', '.join(sorted(set(bad)))}")
    return [(p, _new_tokens(n, default_new_tokens)) for p, n in zip(prompts, counts)]


class TextGenerator(mlflow.pyfunc.PythonModel):
    """Greedy completion of each prompt with a frugalflow model directory (artifact `model_dir`)."""

    def load_context(self, context):
        import torch

        from frugalflow.models import load_model, load_tokenizer

        model_dir = context.artifacts["model_dir"]
        self.model = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model_dir)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        """model_input: a DataFrame with `prompt` (and optional `max_new_tokens`) or a list/array of
        prompts (the hint only keeps MLflow from inferring a schema); params: max_new_tokens
        (default for rows without one), chat (wrap each prompt in the tokenizer's chat template)."""
        import torch
        from transformers import GenerationConfig

        params = params or {}
        chat = bool(params.get("chat", False)) and getattr(self.tokenizer, "chat_template", None) is not None
        requests = as_requests(model_input, _new_tokens(params.get("max_new_tokens"), DEFAULT_NEW_TOKENS))
        tok, device = self.tokenizer, next(self.model.parameters()).device
        eos = tok.eos_token_id if tok.eos_token_id is not None else self.model.generation_config.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        pad = pad[0] if isinstance(pad, list) else pad
        outputs = []
        with torch.inference_mode():
            for prompt, new_tokens in requests:  # one prompt at a time: no padding, exact greedy output
                if chat:
                    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
                    enc = tok(text, return_tensors="pt", add_special_tokens=False)
                else:
                    enc = tok(prompt, return_tensors="pt")
                ids = enc["input_ids"].to(device)
                if ids.shape[1] == 0:
                    raise ValueError("a prompt encodes to zero tokens")
                config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                          eos_token_id=eos, pad_token_id=pad if pad is not None else 0)
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          generation_config=config)
                outputs.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        return outputs


mlflow.models.set_model(TextGenerator())
