"""Runs that overlap in one checkout (a manual run during the nightly one): the DVC step of the second
waits for the first (tasks/lineage.py `checkout_lock`) instead of failing on DVC's own lock, which
DVC gives up on after a few seconds; two `frugalflow run`s started together in one tiny project both
complete, and a lock held past its timeout is exit 4 naming the lock."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from helpers import ROOT, client_for, make_project, tiny_recipe

from frugalflow.errors import ServiceUnavailable
from tasks.lineage import checkout_lock


def test_the_checkout_lock_waits_for_the_holder_and_names_itself_on_timeout(tmp_path):
    (tmp_path / ".dvc").mkdir()
    held = threading.Event()

    def holder():
        with checkout_lock(tmp_path):
            held.set()
            time.sleep(1.5)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    started = time.monotonic()
    with checkout_lock(tmp_path, timeout=30):  # waits for the holder, then has it
        waited = time.monotonic() - started
    thread.join()
    assert 0.8 < waited < 20, waited
    held.clear()
    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    with pytest.raises(ServiceUnavailable) as info, checkout_lock(tmp_path, timeout=0.3):
        pass
    thread.join()
    assert "frugalflow-repro.lock" in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.slow
def test_two_runs_started_together_in_one_checkout_both_complete(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tiny_model_dir, "tiny-shared", data={"calib_windows": 4, "train_windows": 8, "eval_windows": 4},
                         evaluation={"decode_tokens": 4, "decode_race_rounds": 0}, gates={"min_size_reduction": 1.0})
    project = make_project(tmp_path, recipe)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API", "AWS_"))},
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flows.cli", "run", "-p", str(project / "params.yaml")]
    runs = [subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output[-4000:]
        assert "Couldn't lock" not in output
    client = client_for(project)
    experiment = client.get_experiment_by_name("tiny-shared").experiment_id
    parents = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}
