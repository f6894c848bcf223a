"""Distillation losses against naive per-token reference computations."""
from __future__ import annotations

import math

import pytest
import torch

from frugalflow.distill.losses import (
    IGNORE_INDEX,
    ce_loss,
    distill_loss,
    hidden_state_loss,
    kl_loss,
    next_token_labels,
    tsld_loss,
)


def _logits(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() * 2


def _tsld_loop(student, teacher, labels, tau, detach_scale=True, scale_by="target"):
    """Per-token loop straight from the paper's definition (scale_by 'entropy': the teacher's
    entropy in place of its cross-entropy on the label)."""
    B, T, _ = student.shape
    per_seq = []
    for b in range(B):
        valid = [t for t in range(T) if labels[b, t] != IGNORE_INDEX]
        if not valid:
            continue
        if scale_by == "entropy":
            ce = torch.stack([-(torch.softmax(teacher[b, t], -1) * torch.log_softmax(teacher[b, t], -1)).sum()
                              for t in valid])
        else:
            ce = torch.stack([-torch.log_softmax(teacher[b, t], -1)[labels[b, t]] for t in valid])
        if detach_scale:
            ce = ce.detach()
        scale = torch.exp(ce / tau) / torch.exp(ce / tau).sum()
        total = 0.0
        for k, t in enumerate(valid):
            p_t = torch.softmax(teacher[b, t], -1)
            total = total + scale[k] * -(p_t * torch.log_softmax(student[b, t], -1)).sum()
        per_seq.append(total)
    return torch.stack(per_seq).mean()


@pytest.mark.parametrize("scale_by", ["target", "entropy"])
@pytest.mark.parametrize("tau", [10.0, 1.0, 0.3])
def test_tsld_matches_per_token_loop(tau, scale_by):
    s, t = _logits(3, 6, 11, seed=1), _logits(3, 6, 11, seed=2)
    labels = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(3))
    labels[1, 2] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # a sequence with nothing to score is left out of the mean
    got = tsld_loss(s, t, labels, tau=tau, scale_by=scale_by)
    want = _tsld_loop(s.double(), t.double(), labels, tau, scale_by=scale_by)
    assert torch.isfinite(got)
    assert math.isclose(float(got), float(want), rel_tol=1e-5)


def test_tsld_entropy_scale_ignores_which_token_came_next():
    s, t = _logits(2, 6, 11, seed=1), _logits(2, 6, 11, seed=2)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 11, (2, 6), generator=g), torch.randint(0, 11, (2, 6), generator=g)
    a[0, 4] = b[0, 4] = IGNORE_INDEX
    assert not torch.equal(a, b)
    assert float(tsld_loss(s, t, a, scale_by="entropy")) == float(tsld_loss(s, t, b, scale_by="entropy"))
    assert float(tsld_loss(s, t, a, tau=0.5)) != float(tsld_loss(s, t, b, tau=0.5))  # the paper's score does not
    with pytest.raises(ValueError, match="target, entropy"):
        tsld_loss(s, t, a, scale_by="confidence")


def test_tsld_scale_is_detached_and_gradients_match_loop():
    s0, t0 = _logits(2, 5, 7, seed=4), _logits(2, 5, 7, seed=5)
    labels = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(6))
    s1, t1 = s0.double().requires_grad_(), t0.double().requires_grad_()
    tsld_loss(s1, t1, labels, tau=2.0).backward()
    s2, t2 = s0.double().requires_grad_(), t0.double().requires_grad_()
    _tsld_loop(s2, t2, labels, 2.0, detach_scale=True).backward()
    assert torch.allclose(s1.grad.double(), s2.grad, atol=1e-6)
    assert torch.allclose(t1.grad.double(), t2.grad, atol=1e-6)
    # with a non-detached scale the teacher gradient would differ
    s3, t3 = s0.double().requires_grad_(), t0.double().requires_grad_()
    _tsld_loop(s3, t3, labels, 2.0, detach_scale=False).backward()
    assert not torch.allclose(t1.grad.double(), t3.grad, atol=1e-6)


def test_tsld_large_tau_is_plain_mean_soft_ce():
    s, t = _logits(2, 4, 9, seed=7), _logits(2, 4, 9, seed=8)
    labels = torch.randint(0, 9, (2, 4), generator=torch.Generator().manual_seed(9))
    soft_ce = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1)  # [B, T]
    assert math.isclose(float(tsld_loss(s, t, labels, tau=1e9)), float(soft_ce.mean()), rel_tol=1e-5)


def test_kl_zero_when_equal_positive_otherwise():
    a, b = _logits(2, 5, 13, seed=10), _logits(2, 5, 13, seed=11)
    assert abs(float(kl_loss(a, a.clone()))) < 1e-6
    assert float(kl_loss(a, b)) > 1e-3
    # a constant shift of the logits is the same distribution
    assert abs(float(kl_loss(a + 3.0, a))) < 1e-5


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kl_temperature_matches_manual(T):
    s, t = _logits(2, 3, 8, seed=12).double(), _logits(2, 3, 8, seed=13).double()
    total, n = 0.0, 0
    for b in range(2):
        for i in range(3):
            p = torch.softmax(t[b, i] / T, -1)
            q = torch.softmax(s[b, i] / T, -1)
            total += float((p * (p.log() - q.log())).sum())
            n += 1
    assert math.isclose(float(kl_loss(s.float(), t.float(), temperature=T)), total / n * T**2, rel_tol=1e-5)


def test_kl_attention_mask_excludes_tokens():
    s, t = _logits(2, 4, 6, seed=14), _logits(2, 4, 6, seed=15)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    want = kl_loss(s[mask].unsqueeze(0), t[mask].unsqueeze(0))
    assert math.isclose(float(kl_loss(s, t, attention_mask=mask)), float(want), rel_tol=1e-6)
    s2 = s.clone()
    s2[0, 2] += 100.0  # a masked token may be anything
    assert math.isclose(float(kl_loss(s2, t, attention_mask=mask)), float(want), rel_tol=1e-6)


def test_hidden_state_loss_relative_mse_over_chosen_layers():
    teacher = [_logits(2, 3, 4, seed=20 + i) for i in range(3)]
    student = [h + 0.1 * _logits(2, 3, 4, seed=30 + i) for i, h in enumerate(teacher)]
    assert float(hidden_state_loss(teacher, teacher)) == 0.0
    manual = [float(((student[i] - teacher[i]) ** 2).sum() / (teacher[i] ** 2).sum()) for i in range(3)]
    assert math.isclose(float(hidden_state_loss(student, teacher)), (manual[1] + manual[2]) / 2, rel_tol=1e-5)
    assert math.isclose(float(hidden_state_loss(student, teacher, layers=[0])), manual[0], rel_tol=1e-5)
    # normalised: scaling both by 10 changes nothing
    scaled = float(hidden_state_loss([10 * h for h in student], [10 * h for h in teacher]))
    assert math.isclose(scaled, (manual[1] + manual[2]) / 2, rel_tol=1e-5)


def test_ce_loss_matches_manual_and_ignores():
    s = _logits(2, 3, 5, seed=40).double()
    labels = torch.tensor([[1, 4, IGNORE_INDEX], [0, 2, 3]])
    terms = [-torch.log_softmax(s[b, t], -1)[labels[b, t]] for b in range(2) for t in range(3)
             if labels[b, t] != IGNORE_INDEX]
    assert math.isclose(float(ce_loss(s.float(), labels)), float(sum(terms) / len(terms)), rel_tol=1e-5)


def test_next_token_labels_shift_and_mask():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    assert next_token_labels(ids).tolist() == [[6, 7, 8], [2, 3, 4]]
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right- and left-padded rows
    assert next_token_labels(ids, mask).tolist() == [[6, 7, IGNORE_INDEX], [IGNORE_INDEX, 3, 4]]


def test_distill_loss_shifts_once_and_mixes_weights():
    B, L, V = 2, 6, 10
    s, t = _logits(B, L, V, seed=50), _logits(B, L, V, seed=51)
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(52))
    total, parts = distill_loss({"kl": 0.5, "tsld": 2.0, "ce": 1.0}, s, t, ids, temperature=2.0, tau=5.0)
    labels = ids[:, 1:]
    kl = kl_loss(s[:, :-1], t[:, :-1], temperature=2.0)
    ts = tsld_loss(s[:, :-1], t[:, :-1], labels, tau=5.0)
    ce = ce_loss(s[:, :-1], labels)
    assert math.isclose(parts["kl"], float(kl), rel_tol=1e-6)
    assert math.isclose(parts["tsld"], float(ts), rel_tol=1e-6)
    assert math.isclose(parts["ce"], float(ce), rel_tol=1e-6)
    assert math.isclose(float(total), float(0.5 * kl + 2.0 * ts + ce), rel_tol=1e-6)
    # the last position has no target: changing its logits changes nothing
    s2 = s.clone()
    s2[:, -1] += 50.0
    assert math.isclose(float(distill_loss({"kl": 1.0, "tsld": 1.0}, s2, t, ids)[0]),
                        float(distill_loss({"kl": 1.0, "tsld": 1.0}, s, t, ids)[0]), rel_tol=1e-6)


def test_distill_loss_rejects_bad_weights():
    s = _logits(1, 4, 5)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown loss"):
        distill_loss({"mse": 1.0}, s, s, ids)
    with pytest.raises(ValueError, match="non-zero"):
        distill_loss({"kl": 0.0}, s, s, ids)
    with pytest.raises(ValueError, match="hidden"):
        distill_loss({"hidden": 1.0}, s, s, ids)
