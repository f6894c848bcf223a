"""The distillation trainer: masks and grids stay exact, loss falls, runs resume bit-exactly."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_llama
from torch.nn.utils import parametrize

from frugalflow.arch import compressible_linears
from frugalflow.distill.losses import kl_loss
from frugalflow.distill.trainer import CHECKPOINT_FILE, attach_compression, distill, final_weights, lr_schedule, sample_batch
from frugalflow.quant import rtn

FAST = dict(batch_size=2, seq_len=24, temperature=1.0, grad_clip=1.0)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 384, (6, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def teacher():
    return build_tiny_llama(seed=0)


def _masks(student, keep=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=g) < keep for n, m in compressible_linears(student).items()}


def _grids(student, bits=4, group_size=32):
    out = {}
    for n, m in compressible_linears(student).items():
        scale, zero = rtn.compute_qparams(m.weight.detach(), bits, group_size, symmetric=False)
        out[n] = (scale, zero, bits, group_size)
    return out


def lrs(warmup: int, total: int) -> list[float]:
    """The factor on the base lr at each step 0..total."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, out = lr_schedule(optimizer, warmup, total), []
    for _ in range(total + 1):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_lr_schedule_warmup_then_cosine():
    factors = lrs(4, 12)
    assert factors[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert math.isclose(factors[8], 0.5)
    assert factors[11] > 0 and math.isclose(factors[12], 0.0, abs_tol=1e-12)
    assert lrs(0, 10)[0] == 1.0


def test_sample_batch_crops_come_from_windows(windows):
    g = torch.Generator().manual_seed(1)
    batch = sample_batch(windows, 5, 16, g)
    assert batch.shape == (5, 16)
    for row in batch:
        assert any(any(torch.equal(row, w[o:o + 16]) for o in range(40 - 16 + 1)) for w in windows)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_batch(windows, 4, 16, g1), sample_batch(windows, 4, 16, g2))
    assert sample_batch(windows, 2, 1000, g).shape == (2, 40)  # seq_len capped at the window


def _held_out_kl(student, teacher):
    x = torch.randint(0, 384, (4, 24), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        return float(kl_loss(student(input_ids=x).logits, teacher(input_ids=x).logits))


@pytest.mark.parametrize("loss", ["kl", "tsld"])
def test_loss_decreases_and_teacher_untouched(loss, windows, teacher):
    student = build_tiny_llama(seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses, lrs = [], []

    def on_step(step, metrics):
        assert step == len(losses) + 1
        losses.append(metrics["loss"])
        lrs.append(metrics["lr"])

    stats = distill(student, teacher, windows, steps=30, lr=3e-3, loss=loss, warmup_steps=3, on_step=on_step,
                    **{**FAST, "batch_size": 4})
    assert len(losses) == 30 and stats["steps"] == 30 and stats["steps_run"] == 30
    assert stats["resumed_from"] == 0 and stats["final_loss"] == losses[-1]
    assert stats["seconds"] > 0 and stats["seconds_per_step"] > 0
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert _held_out_kl(student, teacher) < 0.8 * _held_out_kl(build_tiny_llama(seed=1), teacher)
    assert lrs[0] == 0.0 and math.isclose(lrs[1], 1e-3) and math.isclose(lrs[3], 3e-3) and lrs[-1] < lrs[3]  # warmup 3
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_masks_stay_zero_during_and_after_training(windows, teacher):
    student = build_tiny_llama(seed=1)
    masks = _masks(student)
    # pruned weights need not be zero yet: attaching the mask zeroes them
    init = {n: m.weight.detach().clone() for n, m in compressible_linears(student).items()}
    seen = []

    def on_step(step, metrics):
        for n, m in compressible_linears(student).items():
            assert parametrize.is_parametrized(m, "weight")
            raw = m.parametrizations.weight.original
            assert torch.all(raw[~masks[n]] == 0) and torch.all(m.weight[~masks[n]] == 0)
        seen.append(step)

    distill(student, teacher, windows, steps=6, lr=1e-2, masks=masks, on_step=on_step, **FAST)
    assert seen == list(range(1, 7))
    moved = 0
    for n, m in compressible_linears(student).items():
        assert not parametrize.is_parametrized(m, "weight") and type(m.weight) is torch.nn.Parameter
        assert torch.all(m.weight[~masks[n]] == 0)
        assert torch.all(m.weight[masks[n]] != 0)
        moved += int((m.weight[masks[n]] != init[n][masks[n]]).sum())
    assert moved > 0.5 * sum(int(mk.sum()) for mk in masks.values())


def test_grids_survive_training_exactly(windows, teacher):
    student = build_tiny_llama(seed=1)
    grids, masks = _grids(student), _masks(student, keep=0.7, seed=5)
    init_codes = {n: rtn.quantize(m.weight.detach() * masks[n], *grids[n])
                  for n, m in compressible_linears(student).items()}
    distill(student, teacher, windows, steps=8, lr=2e-2, masks=masks, grids=grids, **FAST)
    changed = 0
    for n, m in compressible_linears(student).items():
        W = m.weight.detach()
        scale, zero, bits, gs = grids[n]
        q = rtn.quantize(W, scale, zero, bits, gs)
        assert torch.equal(rtn.dequantize(q, scale, zero, gs, W.dtype), W), n
        assert torch.all(W[~masks[n]] == 0)
        changed += int((q != init_codes[n]).sum())
    assert changed > 0  # training did move weights across grid points


def test_final_weights_equal_what_the_forward_used(teacher):
    student = build_tiny_llama(seed=2)
    grids, masks = _grids(student, bits=3, group_size=-1), _masks(student, keep=0.6, seed=2)
    raw = {n: m.weight.detach().clone() for n, m in compressible_linears(student).items()}
    x = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(4))
    names = attach_compression(student, masks, grids)
    assert sorted(names) == sorted(compressible_linears(student))
    with torch.no_grad():
        trained_with = student(input_ids=x).logits
    baked = final_weights(student)
    assert sorted(baked) == sorted(names) and final_weights(student) == {}
    with torch.no_grad():
        plain = student(input_ids=x).logits
    assert torch.equal(trained_with, plain)
    n = names[0]
    assert not torch.equal(baked[n], raw[n])  # the raw weights were not on the grid


def test_straight_through_gradient_reaches_raw_weights():
    student = build_tiny_llama(seed=3)
    name, lin = next(iter(compressible_linears(student).items()))
    masks = {name: torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5}
    attach_compression(student, masks, {name: (*rtn.compute_qparams(lin.weight.detach(), 2, 32, False), 2, 32)})
    student(input_ids=torch.randint(0, 384, (1, 12))).logits.square().mean().backward()
    grad = lin.parametrizations.weight.original.grad
    assert torch.all(grad[~masks[name]] == 0) and (grad[masks[name]] != 0).float().mean() > 0.9


def _run(tmp, windows, teacher, steps=10, on_step=None, **kw):
    student = build_tiny_llama(seed=1)
    masks, grids = _masks(student, seed=7), _grids(student)
    stats = distill(student, teacher, windows, steps=steps, lr=5e-3, warmup_steps=2, checkpoint_dir=tmp,
                    checkpoint_every=5, masks=masks, grids=grids, seed=3, on_step=on_step, **FAST, **kw)
    return student, stats


class _Killed(Exception):
    pass


def _kill_at(step):
    def on_step(s, metrics):
        if s == step:
            raise _Killed
    return on_step


def test_killed_run_resumes_bit_exactly(tmp_path, windows, teacher):
    full, full_stats = _run(tmp_path / "a", windows, teacher)
    assert full_stats["resumed_from"] == 0
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("the caller's")
    with pytest.raises(_Killed):
        _run(tmp_path / "b", windows, teacher, on_step=_kill_at(7))
    assert torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)["step"] == 5
    resumed, stats = _run(tmp_path / "b", windows, teacher)
    assert stats["resumed_from"] == 5 and stats["steps_run"] == 5 and stats["steps"] == 10
    assert stats["final_loss"] == full_stats["final_loss"]
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    sa = torch.load(tmp_path / "a" / CHECKPOINT_FILE, weights_only=True)
    sb = torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)
    assert sa["step"] == sb["step"] == 10
    assert sa["scheduler"] == sb["scheduler"]
    assert torch.equal(sa["generator"], sb["generator"])
    for k, state in sa["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, sb["optimizer"]["state"][k][key]), (k, key)
    # nothing of the caller's removed, no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted([CHECKPOINT_FILE, "notes.txt"])


def test_finished_run_resumes_at_its_end(tmp_path, windows, teacher):
    done, _ = _run(tmp_path, windows, teacher)
    calls = []
    again, stats = _run(tmp_path, windows, teacher, on_step=lambda s, m: calls.append(s))
    assert stats["resumed_from"] == 10 and stats["steps_run"] == 0 and calls == []
    assert math.isfinite(stats["final_loss"])
    for (n, a), (_, b) in zip(done.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_resume_refuses_changed_settings(tmp_path, windows, teacher):
    _run(tmp_path, windows, teacher, steps=5)
    with pytest.raises(ValueError, match="different settings"):
        distill(build_tiny_llama(seed=1), teacher, windows, steps=10, lr=1e-1, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match="beyond"):
        _run(tmp_path, windows, teacher, steps=3)


def test_grad_accum_and_log_every(windows, teacher):
    logged = []
    stats = distill(build_tiny_llama(seed=1), teacher, windows, steps=5, lr=1e-3, grad_accum=2, log_every=2,
                    on_step=lambda s, m: logged.append(s), **FAST)
    assert logged == [2, 4, 5] and stats["steps_run"] == 5


def test_bad_names_and_shapes_are_reported(windows, teacher):
    student = build_tiny_llama(seed=1)
    with pytest.raises(KeyError, match="no module"):
        attach_compression(student, {"model.layers.9.mlp.up_proj": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        attach_compression(student, {"model.layers.0.mlp.up_proj": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="loss"):
        distill(student, teacher, windows, steps=1, loss="mse")


def test_mixed_loss_with_hidden_states(windows, teacher):
    seen = []
    stats = distill(build_tiny_llama(seed=1), teacher, windows, steps=3, lr=1e-3,
                    loss_weights={"kl": 1.0, "hidden": 0.5, "ce": 0.1}, on_step=lambda s, m: seen.append(m), **FAST)
    assert stats["steps_run"] == 3 and all({"kl", "hidden", "ce"} <= set(m) for m in seen)
    assert all(math.isclose(m["loss"], m["kl"] + 0.5 * m["hidden"] + 0.1 * m["ce"], rel_tol=1e-4) for m in seen)


def test_mixed_precision_follows_the_hardware(monkeypatch):
    """bf16 autocast on a CPU only where it computes bf16 natively; fp32 (no autocast) elsewhere."""
    from frugalflow.distill import trainer

    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    autocast, scaler = trainer._amp(cpu, True)
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    autocast, scaler = trainer._amp(cpu, True)
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert scaler is None
    autocast, _ = trainer._amp(cpu, False)
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
