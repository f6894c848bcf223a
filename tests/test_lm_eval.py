"""lm-evaluation-harness on the shipped offline task (evals/lm_eval/pydoc_mc), on a packed 4-bit
tiny model, checked against a naive log-likelihood reference; its settings in the cache key."""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from frugalflow.arch import compressible_linears
from frugalflow.config import EvaluationConfig, LMEvalConfig, RecipeError
from frugalflow.evaluate.harness import flatten_results, include_hash, metric_name
from frugalflow.evaluate.suite import evaluate_model, evaluation_key
from frugalflow.models import load_model, load_tokenizer, save_model
from frugalflow.quant.pack import quantize_model
from frugalflow.quant.rtn import compute_qparams, quantize
from frugalflow.recipe_io import recipe_from_dict

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "evals" / "lm_eval" / "pydoc_mc"
QUESTION = "Which section of the Python language reference is this passage from?"
LIMIT = 5


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, tiny_model_dir):
    model = load_model(tiny_model_dir)
    qparams = {}
    for name, m in compressible_linears(model).items():
        scale, zero = compute_qparams(m.weight.data, 4, 32, False)
        qparams[name] = (quantize(m.weight.data, scale, zero, 4, 32), scale, zero)
    return save_model(quantize_model(model, qparams, 4, 32), tmp_path_factory.mktemp("q4") / "model",
                      tokenizer_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_tokenizer):
    data = tmp_path_factory.mktemp("data")
    ids = torch.arange(2 * 32) % 300
    save_file({"windows": ids.reshape(2, 32)}, str(data / "eval.safetensors"))
    (data / "manifest.json").write_text(json.dumps({"window": 32}))
    return data


def naive_scores(model, tokenizer, docs: list[dict]) -> tuple[float, float]:
    """acc and acc_norm by hand: sum of log p(' ' + choice | prompt) per choice, argmax vs label
    (acc_norm divides by the choice's length in bytes, as lm-eval does)."""
    hits = hits_norm = 0
    for doc in docs:
        context = f"Passage: {doc['passage']}\nQuestion: {QUESTION}\nAnswer:"
        ctx = tokenizer.encode(context)
        lls = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(context + " " + choice)
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
            lls.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        norm = [ll / len((" " + c).encode()) for ll, c in zip(lls, doc["choices"])]
        hits += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == doc["label"]
    return hits / len(docs), hits_norm / len(docs)


def test_local_task_on_packed_model_matches_naive_reference(packed_dir, data_dir):
    cfg = EvaluationConfig(decode_tokens=2, decode_repeats=1,
                           lm_eval={"tasks": ["pydoc_mc"], "include_path": "evals/lm_eval", "limit": LIMIT})
    metrics = evaluate_model(packed_dir, data_dir, cfg, root=ROOT)
    assert metrics["lm_eval.pydoc_mc.samples"] == LIMIT
    acc, acc_norm = metrics["lm_eval.pydoc_mc.acc"], metrics["lm_eval.pydoc_mc.acc_norm"]
    assert 0.0 <= acc <= 1.0 and 0.0 <= acc_norm <= 1.0
    assert math.isclose(acc * LIMIT, round(acc * LIMIT))  # k of LIMIT documents
    docs = [json.loads(line) for line in (TASK_DIR / "pydoc_mc.jsonl").read_text().splitlines()[:LIMIT]]
    model, tokenizer = load_model(packed_dir), load_tokenizer(packed_dir)
    want_acc, want_norm = naive_scores(model, tokenizer, docs)
    assert (acc, acc_norm) == (want_acc, want_norm)
    assert metrics["lm_eval.pydoc_mc.acc_stderr"] >= 0 and metrics["ppl"] > 1


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="pydoc topics differ by Python version; made with 3.11")
def test_shipped_task_data_is_reproducible():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_data", TASK_DIR / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    items = module.build()
    shipped = [json.loads(line) for line in (TASK_DIR / "pydoc_mc.jsonl").read_text().splitlines()]
    assert items == shipped and len(shipped) >= 50
    for item in shipped:
        assert len(item["choices"]) == 4 == len(set(item["choices"])) and 0 <= item["label"] < 4


def test_lm_eval_settings_and_task_files_enter_the_cache_key(tiny_model_dir, data_dir, tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, tasks / "pydoc_mc")
    lm = {"tasks": ["pydoc_mc"], "include_path": str(tasks), "limit": 4}
    key = evaluation_key(tiny_model_dir, data_dir, EvaluationConfig(lm_eval=lm), "cpu", root=tmp_path)
    assert evaluation_key(tiny_model_dir, data_dir, EvaluationConfig(lm_eval=lm), "cpu", root=tmp_path) == key
    assert evaluation_key(tiny_model_dir, data_dir, EvaluationConfig(), "cpu", root=tmp_path) != key
    assert evaluation_key(tiny_model_dir, data_dir, EvaluationConfig(lm_eval={**lm, "limit": 5}), "cpu",
                          root=tmp_path) != key
    before = include_hash(LMEvalConfig(**lm), tmp_path)
    with open(tasks / "pydoc_mc" / "pydoc_mc.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "x", "passage": "p", "choices": ["a", "b", "c", "d"], "label": 0}) + "\n")
    assert include_hash(LMEvalConfig(**lm), tmp_path) != before
    assert evaluation_key(tiny_model_dir, data_dir, EvaluationConfig(lm_eval=lm), "cpu", root=tmp_path) != key


def test_lm_eval_config_and_errors(tmp_path):
    with pytest.raises(RecipeError, match="evaluation.lm_eval.tasks"):
        recipe_from_dict({"stages": [{"method": "rtn"}], "evaluation": {"lm_eval": {"tasks": []}}})
    with pytest.raises(RecipeError, match="include_path: 'nowhere' is not a folder"):
        include_hash(LMEvalConfig(tasks=["pydoc_mc"], include_path="nowhere"), tmp_path)
    assert recipe_from_dict({"stages": [{"method": "rtn"}]}).evaluation.lm_eval is None  # off by default


def test_results_are_flattened():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                 "exact_match,strict-match": 0.25}},
               "n-samples": {"t": {"original": 10, "effective": 4}}}
    assert flatten_results(results) == {"lm_eval.t.acc": 0.5, "lm_eval.t.exact_match.strict-match": 0.25,
                                        "lm_eval.t.samples": 4}
    assert metric_name("t", "acc_norm,none") == "lm_eval.t.acc_norm"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_whole_evaluation_on_cuda(packed_dir, data_dir, tmp_path):
    (tmp_path / "notes.txt").write_text(" ".join(f"word{i % 37}" for i in range(400)))
    cfg = EvaluationConfig(decode_tokens=4, decode_repeats=2, prefill_tokens=64,
                           sets={"notes": {"text_files": str(tmp_path / "notes.txt")}},
                           lm_eval={"tasks": ["pydoc_mc"], "include_path": "evals/lm_eval", "limit": LIMIT})
    gpu = evaluate_model(packed_dir, data_dir, cfg, device="cuda", root=ROOT)
    cpu = evaluate_model(packed_dir, data_dir, cfg.model_copy(update={"lm_eval": None}), device="cpu", root=ROOT)
    assert math.isclose(gpu["ppl"], cpu["ppl"], rel_tol=1e-3)
    assert math.isclose(gpu["ppl.notes"], cpu["ppl.notes"], rel_tol=1e-3) and gpu["windows.notes"] >= 1
    assert gpu["lm_eval.pydoc_mc.samples"] == LIMIT and 0 <= gpu["lm_eval.pydoc_mc.acc"] <= 1
    assert gpu["peak_mem_mb"] >= gpu["weights_mem_mb"] > 0 and gpu["prefill_tokens"] == 64
    assert 0 < gpu["latency_p50_ms"] <= gpu["latency_p95_ms"]
