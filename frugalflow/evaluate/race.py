"""The decode race: a candidate's decode speed against the base model's, measured in the same
evaluation, interleaved round by round (`speed.interleaved_decode_tps`, medians), so that the
speed gate compares like with like instead of with a figure cached in another hour.

Both models are loaded on `device` as the evaluation loads them (`load_model`: float32
activations); the prompt is tokenized with the base model's tokenizer. Metrics: `decode_tps` (the
candidate's median), `base_decode_tps` (the base model's), `decode_speedup` (their ratio) and
`decode_race_rounds`.
"""
from __future__ import annotations

import gc
from pathlib import Path

from frugalflow.evaluate.speed import interleaved_decode_tps
from frugalflow.models import load_model, load_tokenizer


def decode_race(base_dir: Path, model_dir: Path, prompt: str, rounds: int, new_tokens: int = 64,
                device: str = "cpu") -> dict:
    """Median decode tokens/s of the candidate and the base model over `rounds` interleaved rounds."""
    if rounds < 1:
        raise ValueError(f"evaluation.decode_race_rounds: the race needs at least one round, got {rounds}")
    models = {"base": load_model(Path(base_dir), device=device),
              "candidate": load_model(Path(model_dir), device=device)}
    try:
        tps = interleaved_decode_tps(models, load_tokenizer(Path(base_dir)), prompt, rounds, new_tokens=new_tokens)
    finally:
        models.clear()
        gc.collect()
    return {"decode_tps": tps["candidate"], "base_decode_tps": tps["base"],
            "decode_speedup": tps["candidate"] / tps["base"], "decode_race_rounds": rounds}
