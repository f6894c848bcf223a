"""Distillation losses as plain tensor functions.

Every per-token loss takes logits [B, T, V] (or [N, V]) that are already aligned with
their targets: position t of the logits predicts `labels[t]`. The one place that turns a
batch of input ids into next-token targets is `next_token_labels` (used by
`distill_loss`); ignored positions carry `IGNORE_INDEX`.

- `kl_loss`: mean over tokens of KL(p_teacher^T || p_student^T) * T^2 (Hinton et al. 2015).
- `tsld_loss`: token-scaled logit distillation (Kim et al. 2023, arXiv:2308.06744): each
  token's soft cross-entropy is weighted by softmax_t(ce_teacher_t / tau) over the sequence,
  so tokens the teacher finds hard count more; weights are detached, sum over tokens,
  mean over sequences. `scale_by="entropy"` scores a token by the teacher's entropy instead:
  its expected cross-entropy, which on text the teacher sampled itself is the sampled token's
  cross-entropy without the sampling noise. Its authors train it together with the
  ground-truth cross-entropy (their `tsld` option: `gt + tsld`, the TSLD term summed over a
  batch of B sequences, the cross-entropy averaged); with the mean over sequences here,
  `ce_weight` 1/B gives their mix, 0.5 at our batch of 2.
- `hidden_state_loss`: relative MSE ||h_s - h_t||^2 / ||h_t||^2, averaged over chosen layers.
- `ce_loss`: ordinary next-token cross-entropy on the labels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSSES = ("kl", "tsld", "ce", "hidden")
TOKEN_SCORES = ("target", "entropy")  # what TSLD's token scale is a softmax of (over tau)


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for logits[:, :-1]: labels[:, t] = input_ids[:, t + 1], IGNORE_INDEX where
    either the predicting position or the target is masked out. Shape [B, T - 1]."""
    labels = input_ids[:, 1:].clone()
    if attention_mask is not None:
        valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
        labels[~valid] = IGNORE_INDEX
    return labels


def _token_mask(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if attention_mask.shape != logits.shape[:-1]:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                         f"logits tokens {tuple(logits.shape[:-1])}")
    return attention_mask.bool()


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (unmasked) tokens of KL(teacher_T || student_T) * T^2, computed in float32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    mask = _token_mask(student_logits, attention_mask)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    n = mask.sum()
    if n == 0:
        return per_token.sum() * 0.0
    return (per_token * mask).sum() / n * temperature**2


def tsld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              tau: float = 10.0, scale_by: str = "target") -> torch.Tensor:
    """Token-scaled logit distillation on logits [B, T, V] aligned with labels [B, T].

    score_t = -log p_teacher(label_t) (scale_by 'target') or H(p_teacher_t) ('entropy');
    s = softmax over the sequence of score / tau (detached, ignored tokens get weight 0);
    loss = mean over sequences of sum_t s_t * H(p_teacher_t, p_student_t).
    """
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"expected logits [B, T, V] and labels [B, T], got {tuple(student_logits.shape)} "
                         f"and {tuple(labels.shape)}")
    scale = token_scale(teacher_logits, labels, tau, scale_by)
    t_probs = torch.softmax(teacher_logits.float(), dim=-1)
    soft_ce = -(t_probs * F.log_softmax(student_logits.float(), dim=-1)).sum(-1)
    per_seq = (scale * soft_ce).sum(-1)
    rows = (labels != IGNORE_INDEX).any(-1)
    if not rows.any():
        return per_seq.sum() * 0.0
    return per_seq[rows].mean()


@torch.no_grad()
def token_scale(teacher_logits: torch.Tensor, labels: torch.Tensor, tau: float = 10.0,
                scale_by: str = "target") -> torch.Tensor:
    """TSLD's token weights [B, T]: softmax over each sequence of score / tau, score_t the teacher's
    cross-entropy on labels[t] ('target') or its entropy ('entropy'); ignored tokens get weight 0
    and a sequence with no valid token all 0."""
    if scale_by not in TOKEN_SCORES:
        raise ValueError(f"scale_by must be one of {', '.join(TOKEN_SCORES)}, got {scale_by!r}")
    t_logits = teacher_logits.float()
    if scale_by == "entropy":
        score = -(torch.softmax(t_logits, dim=-1) * F.log_softmax(t_logits, dim=-1)).sum(-1)
    else:
        score = F.cross_entropy(t_logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    scores = (score / tau).masked_fill(labels == IGNORE_INDEX, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def hidden_state_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                      layers: Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
                      eps: float = 1e-8) -> torch.Tensor:
    """Mean over `layers` of ||h_s - h_t||^2 / ||h_t||^2 over (unmasked) tokens.

    Hidden states are HF-style tuples of [B, T, H] (index 0: embeddings). `layers=None`:
    every index from 1 on (the embedding output is usually not compressed)."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student vs {len(teacher_hidden)} teacher hidden states")
    chosen = list(layers) if layers is not None else list(range(1, len(teacher_hidden)))
    if not chosen:
        raise ValueError("hidden_state_loss needs at least one layer")
    total = None
    for i in chosen:
        s, t = student_hidden[i].float(), teacher_hidden[i].float()
        w = _token_mask(t, attention_mask).unsqueeze(-1).float()
        err = (((s - t) ** 2) * w).sum() / (((t**2) * w).sum() + eps)
        total = err if total is None else total + err
    return total / len(chosen)


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits [..., V] against aligned labels, mean over non-ignored tokens."""
    return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def distill_loss(weights: dict[str, float], student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                 temperature: float = 1.0, tau: float = 10.0, tsld_scale_by: str = "target",
                 student_hidden: Sequence[torch.Tensor] | None = None,
                 teacher_hidden: Sequence[torch.Tensor] | None = None,
                 hidden_layers: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """sum_k weights[k] * loss_k over k in {'kl', 'tsld', 'ce', 'hidden'}.

    Logits are the full [B, L, V] model outputs for `input_ids` [B, L]; the next-token
    shift happens here. Returns (total loss, {name: float value of each unweighted part})."""
    unknown = set(weights) - set(LOSSES)
    if unknown:
        raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; allowed: {', '.join(LOSSES)}")
    active = {k: float(w) for k, w in weights.items() if w}
    if not active:
        raise ValueError("distill_loss needs at least one non-zero weight")
    labels = next_token_labels(input_ids, attention_mask)
    s, t = student_logits[:, :-1], teacher_logits[:, :-1]
    parts: dict[str, torch.Tensor] = {}
    if "kl" in active:
        parts["kl"] = kl_loss(s, t, temperature, labels != IGNORE_INDEX)
    if "tsld" in active:
        parts["tsld"] = tsld_loss(s, t, labels, tau, tsld_scale_by)
    if "ce" in active:
        parts["ce"] = ce_loss(s, labels)
    if "hidden" in active:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError("the 'hidden' loss needs student_hidden and teacher_hidden")
        parts["hidden"] = hidden_state_loss(student_hidden, teacher_hidden, hidden_layers, attention_mask)
    total = sum(active[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}
