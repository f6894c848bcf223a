"""Text the base model writes itself: token windows it samples from its begin-of-sequence token,
optionally followed by a prompt (e.g. a few words of a language), so the text has no corpus's domain."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def generated_windows(teacher_dir: str | Path, n: int, length: int, seed: int, batch: int = 16, device: str = "cpu",
                      on_batch: Callable[[int, int], None] | None = None,
                      prompts: list[str] | None = None) -> torch.Tensor:
    """[n, length] token ids the teacher samples (temperature 1, top-p 0.95) from its BOS token, seeded.
    With `prompts`, row i begins with the tokens of prompts[i % len(prompts)] ('' = none) and the
    teacher continues it; the prompt's tokens count in the row's length. `on_batch(done, n)` after
    each batch (default: a line on stdout)."""
    from frugalflow.models import load_model, load_tokenizer

    model, tok = load_model(teacher_dir, device=device), load_tokenizer(teacher_dir)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    # min_new_tokens == max_new_tokens: no row ends early, so nothing is ever padded and any pad id
    # other than BOS does; it only keeps generate from taking the one-token BOS prompts for right-padding.
    pad = next((p for p in (model.generation_config.pad_token_id, tok.pad_token_id, tok.eos_token_id)
                if p is not None and p != bos), (bos + 1) % model.config.vocab_size)
    prompts = list(prompts or [""])
    heads = [tok(p, add_special_tokens=False).input_ids if p else [] for p in prompts]
    for p, head in zip(prompts, heads):
        if len(head) >= length:
            raise ValueError(f"generated_prompts: {p!r} is {len(head)} tokens, not shorter than the "
                             f"{length} tokens of a generated sequence")
    torch.manual_seed(seed)
    rows: list[torch.Tensor | None] = [None] * n
    done = 0
    for k, head in enumerate(heads):  # rows of one prompt together: equal lengths, no padding
        mine = list(range(k, n, len(heads)))
        for start in range(0, len(mine), batch):
            take = mine[start:start + batch]
            ids = torch.tensor([[bos, *head]] * len(take), dtype=torch.long, device=device)
            new = length - len(head)
            with torch.inference_mode():
                seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=1.0, top_p=0.95, max_new_tokens=new, min_new_tokens=new,
                                     pad_token_id=pad)
            for row, out in zip(take, seq[:, 1:length + 1].cpu()):
                rows[row] = out
            done += len(take)
            if on_batch is not None:
                on_batch(done, n)
            else:
                print(f"generated {done}/{n} sequences of {length} tokens", flush=True)
    return torch.stack(rows)
