"""Atomic, checksummed cache entries: a truncated or altered stage output, evaluation entry or
checkpoint is detected, reported (a log line naming the file), set aside and recomputed; never
reused, never failing every later run."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from frugalflow.config import EvaluationConfig, MagnitudePrune
from frugalflow.errors import CorruptData
from frugalflow.integrity import (
    atomic_write_bytes,
    load_checkpoint,
    read_json_checked,
    save_checkpoint,
    seal_dir,
    verify_manifest,
    write_json_checked,
)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def logged():
    handler = Lines()
    loggers = [logging.getLogger(n) for n in ("prefect.task_runs", "frugalflow")]
    # an earlier test's logging.config (alembic's fileConfig, say) may have disabled existing loggers
    was = [(lg.disabled, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.disabled = False
        lg.setLevel(logging.INFO)
    yield handler.lines
    for lg, (disabled, level) in zip(loggers, was):
        lg.removeHandler(handler)
        lg.disabled, lg.level = disabled, level


# --------------------------------------------------------------------------- the primitives
def test_atomic_write_leaves_no_temporary_file(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"old")
    atomic_write_bytes(tmp_path / "a.bin", b"new")
    assert (tmp_path / "a.bin").read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_checked_json_detects_truncation_and_alteration(tmp_path):
    path = tmp_path / "e.json"
    write_json_checked(path, {"ppl": 12.5, "size_mb": 3.0})
    assert read_json_checked(path) == {"ppl": 12.5, "size_mb": 3.0}
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(CorruptData, match="e.json"):
        read_json_checked(path)
    path.write_text(text.replace("12.5", "11.5"))  # a plausible, wrong value
    with pytest.raises(CorruptData, match="does not match its checksum"):
        read_json_checked(path)
    path.write_text(json.dumps({"ppl": 12.5}))  # an entry written before checksums
    with pytest.raises(CorruptData):
        read_json_checked(path)


def test_manifest_names_the_damaged_file(tmp_path):
    tmp = tmp_path / ".entry.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(bytes(range(200)))
    (tmp / "stats.json").write_text("{}\n")
    entry = seal_dir(tmp, tmp_path / "entry")
    verify_manifest(entry)
    weights = entry / "model.safetensors"
    weights.write_bytes(bytes(range(100)))
    with pytest.raises(CorruptData, match="model.safetensors: 100 bytes, the manifest says 200"):
        verify_manifest(entry)
    weights.write_bytes(bytes(reversed(range(200))))  # same size, other content
    with pytest.raises(CorruptData, match="model.safetensors: content does not match"):
        verify_manifest(entry)
    weights.write_bytes(bytes(range(200)))
    (entry / "extra.bin").write_bytes(b"x")
    with pytest.raises(CorruptData, match="extra.bin: not in the manifest"):
        verify_manifest(entry)
    (entry / "extra.bin").unlink()
    (entry / "stats.json").unlink()
    with pytest.raises(CorruptData, match="stats.json: listed in the manifest but missing"):
        verify_manifest(entry)


def test_a_corrupt_checkpoint_is_set_aside_not_trusted(tmp_path, logged):
    state = {"step": 3, "student": {"w": torch.randn(4, 4)}, "rng": torch.get_rng_state()}
    path = tmp_path / "distill_state.pt"
    save_checkpoint(state, path)
    back = load_checkpoint(path)
    assert back["step"] == 3 and torch.equal(back["student"]["w"], state["student"]["w"])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])  # truncated
    assert load_checkpoint(path) is None and not path.exists()
    assert any("distill_state.pt" in line and "not a readable checkpoint" in line for line in logged)
    save_checkpoint(state, path)
    digest = torch.load(path, weights_only=True)["sha256"]
    torch.save({**state, "student": {"w": state["student"]["w"] + 1}, "sha256": digest}, path)
    assert load_checkpoint(path) is None  # valid torch file, content changed: the checksum catches it
    assert any("does not match its checksum" in line for line in logged)
    assert len(list(tmp_path.glob("distill_state.pt.corrupt-*"))) == 2


def test_distillation_restarts_from_scratch_on_a_corrupt_checkpoint(tmp_path, tiny_model):
    from conftest import build_tiny_llama

    from frugalflow.distill.trainer import CHECKPOINT_FILE, distill

    windows = torch.randint(0, 300, (4, 32))

    def train(ckpt: Path | None):
        student = build_tiny_llama(seed=1)
        teacher = build_tiny_llama(seed=0)
        stats = distill(student, teacher, windows, steps=2, batch_size=2, seq_len=16, lr=1e-3,
                        checkpoint_dir=ckpt, checkpoint_every=1, amp=False)
        return stats, {k: v.clone() for k, v in student.state_dict().items()}

    _, reference = train(None)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 half a zip file")
    stats, weights = train(ckpt)
    assert stats["resumed_from"] == 0 and stats["steps_run"] == 2
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


# --------------------------------------------------------------------------- stage outputs and evaluations
@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_harness):
    from tasks import tracking as T

    root = tmp_path_factory.mktemp("integrity")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = T.connect(uri)
    exp = T.experiment_id(client, "integrity", root / "mlartifacts")
    parent = T.start_run(client, exp, "parent")
    return root, T.Tracking(uri=uri, experiment_id=exp, parent_run_id=parent)


def _stage(store, tiny_model_dir):
    from tasks.compress import compress_stage

    root, tracking = store
    return compress_stage(MagnitudePrune(method="magnitude", sparsity=0.5), 0, str(tiny_model_dir), "base-key",
                          data_dir=str(root / "data"), data_key="data-key", teacher_dir=str(tiny_model_dir),
                          artifacts_dir=str(root / "artifacts"), device="cpu", seed=0, pruned=False,
                          tracking=tracking)


def _said(logged: list[str], capfd) -> list[str]:
    """What the run logged: records seen by the handler, plus whatever reached stderr (Prefect's
    console handler prints task-run logs there, or not, depending on what ran before)."""
    lines = [*logged, *capfd.readouterr().err.splitlines()]
    logged.clear()
    return lines


def test_stage_output_is_sealed_reused_and_recomputed_when_damaged(store, tiny_model_dir, capfd, logged):
    first = _stage(store, tiny_model_dir)
    out = Path(first["dir"])
    assert not first["cached"] and (out / "manifest.json").is_file()
    verify_manifest(out)
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # the temporary folder was renamed into place
    assert _stage(store, tiny_model_dir)["cached"]

    # a weights file truncated after the fact: detected, reported, set aside, recomputed
    weights = out / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 3])
    again = _stage(store, tiny_model_dir)
    assert not again["cached"] and weights.read_bytes() == original  # magnitude pruning is deterministic
    assert any("model.safetensors" in line and "not reused" in line for line in _said(logged, capfd))
    assert len(list(out.parent.glob(f"{out.name}.corrupt-*"))) == 1
    verify_manifest(out)

    # stats.json altered (a plausible number): the manifest's checksum catches it
    stats = out / "stats.json"
    stats.write_text(stats.read_text().replace('"sparsity": 0.5', '"sparsity": 0.25'))
    assert not _stage(store, tiny_model_dir)["cached"]
    assert json.loads(stats.read_text())["sparsity"] == pytest.approx(0.5, abs=0.01)

    # an interrupted writer's temporary folder: removed, not used
    stale = out.parent / f".{out.name}.tmp-999-abcdef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert _stage(store, tiny_model_dir)["cached"] and not stale.exists()
    assert any(stale.name in line and "interrupted write" in line for line in _said(logged, capfd))


def test_evaluation_entry_is_checksummed_and_recomputed_when_altered(store, tiny_model_dir, capfd, logged):
    from tasks.evaluate import evaluate

    root, _ = store
    data = root / "eval-data"
    data.mkdir(exist_ok=True)
    torch.manual_seed(0)
    save_file({"windows": torch.randint(0, 300, (3, 32))}, str(data / "eval.safetensors"))
    cfg = EvaluationConfig(decode_tokens=4, decode_repeats=1, decode_race_rounds=0) \
        if "decode_race_rounds" in EvaluationConfig.model_fields else EvaluationConfig(decode_tokens=4,
                                                                                        decode_repeats=1)
    args = (str(tiny_model_dir), str(data), cfg, str(root / "artifacts"), "cpu", "tiny")
    first = evaluate(*args, root=str(root))
    assert not first["cached"] and evaluate(*args, root=str(root))["cached"]
    [entry] = (root / "artifacts" / "evaluations").glob("*.json")
    entry.write_text(entry.read_text().replace(f'"ppl": {first["ppl"]!r}', '"ppl": 1.0'))
    again = evaluate(*args, root=str(root))
    assert not again["cached"] and again["ppl"] == pytest.approx(first["ppl"], rel=1e-6)
    said = [line for line in _said(logged, capfd) if "evaluate tiny: cache entry not reused" in line]
    assert said and entry.name in said[0], said
    entry.write_text(entry.read_text()[:40])  # truncated, as by a kill during an in-place write
    assert not evaluate(*args, root=str(root))["cached"]
    assert read_json_checked(entry)["ppl"] == pytest.approx(first["ppl"], rel=1e-6)
    assert len(list(entry.parent.glob(f"{entry.name}.corrupt-*"))) == 2
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no temporary files left
