"""Text with no domain: token windows the base model samples itself from its begin-of-sequence token."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def generated_windows(teacher_dir: str | Path, n: int, length: int, seed: int, batch: int = 16, device: str = "cpu",
                      on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """[n, length] token ids the teacher samples (temperature 1, top-p 0.95) from its BOS token, seeded;
    `on_batch(done, n)` after each batch (default: a line on stdout)."""
    from frugalflow.models import load_model, load_tokenizer

    model, tok = load_model(teacher_dir, device=device), load_tokenizer(teacher_dir)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    # min_new_tokens == max_new_tokens: no row ends early, so nothing is ever padded and any pad id
    # other than BOS does; it only keeps generate from taking the one-token BOS prompts for right-padding.
    pad = next((p for p in (model.generation_config.pad_token_id, tok.pad_token_id, tok.eos_token_id)
                if p is not None and p != bos), (bos + 1) % model.config.vocab_size)
    torch.manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        rows = min(batch, n - start)
        ids = torch.full((rows, 1), bos, dtype=torch.long, device=device)
        with torch.inference_mode():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_p=0.95, max_new_tokens=length, min_new_tokens=length,
                                 pad_token_id=pad)
        out.append(seq[:, 1:length + 1].cpu())
        if on_batch is not None:
            on_batch(start + rows, n)
        else:
            print(f"generated {start + rows}/{n} sequences of {length} tokens", flush=True)
    return torch.cat(out)
