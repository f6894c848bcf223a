"""The MLflow UI, seen in a browser: two real flow runs of a tiny project (the second with a
different sparsity), `frugalflow ui` on its sqlite store, and headless Chromium (Debian's
`chromium`, driven through its own command line: no Python browser package) rendering the
experiment's runs page and the registered model's page. Both run names must be on the first,
and each version's aliases (`champion`, `challenger`) as the registry has them on the second.
Screenshots and DOM dumps are kept in test-artifacts/ui/ at the repo root.

`make test` installs chromium first (`make browser`, apt-get as root); without it (and no root
to install it) this test is skipped, saying so."""
from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, client_for, free_port, make_project, run_flow, stop, tiny_recipe, wait_healthy

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
ARTIFACTS = ROOT / "test-artifacts" / "ui"
SERVER_START_S, BROWSER_S, VIRTUAL_MS = 90, 120, 20000
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `make browser` installs Debian's "
                                 "chromium (apt-get, as root); `make test` does so first when it can")]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    recipe = tiny_recipe(tiny_model_dir, "tiny-ui", data={"calib_windows": 4, "train_windows": 8, "eval_windows": 4},
                         evaluation={"decode_tokens": 4}, gates={"min_size_reduction": 1.0})
    return make_project(tmp_path_factory.mktemp("project"), recipe)


@pytest.fixture(scope="module")
def two_runs(prefect_harness, project):
    first = run_flow(project)
    time.sleep(1.1)  # run names carry a stamp to the second
    second = run_flow(project, ["stages.0.sparsity=0.4"])
    return first, second


@pytest.fixture(scope="module")
def ui(project, tmp_path_factory):
    """`frugalflow ui` on the project's store (one worker), in its own session; its URL once
    /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    env = {**os.environ, "MLFLOW_WORKERS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "-p", str(project / "params.yaml"),
                                 "--port", str(port)], cwd=project, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        seconds = wait_healthy(proc, f"{url}/health", log, "frugalflow ui", SERVER_START_S)
        print(f"MLflow UI up after {seconds:.1f} s on {url}")
        yield url
    finally:
        stop(proc, signal.SIGTERM, 15)


def browse(url: str, name: str, profile: Path, height: int = 1000) -> str:
    """Render `url` in headless Chromium (fresh profile, no network beyond 127.0.0.1), keep a
    screenshot and the DOM as test-artifacts/ui/<name>.{png,html}; the page's visible text."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = ARTIFACTS / f"{name}.png"
    png.unlink(missing_ok=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
           f"--window-size=1600,{height}", f"--virtual-time-budget={VIRTUAL_MS}", f"--screenshot={png}",
           "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_S)
    assert done.returncode == 0, f"chromium exited with {done.returncode}:\n{done.stderr[-3000:]}"
    (ARTIFACTS / f"{name}.html").write_text(done.stdout)
    assert png.stat().st_size > 10_000, f"no screenshot of {url}"
    print(f"screenshot of {url}: {png}")
    return page_text(done.stdout)


def page_text(dom: str) -> str:
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text)).replace("\xa0", " ")
    return re.sub(r"\s+", " ", text)


def aliases_by_version(text: str) -> dict[str, set[str]]:
    """The versions table of a registered model's page: {version: {alias, ...}} from the text of
    each row, which starts "Version <n> " and shows aliases as "@ <alias>"."""
    parts = re.split(r"\bVersion (\d+) ", text)
    return {parts[i]: set(re.findall(r"@ (\w+)", parts[i + 1])) for i in range(1, len(parts) - 1, 2)}


def test_ui_shows_both_runs_and_the_champion(two_runs, project, ui, tmp_path):
    client = client_for(project)
    experiment = client.get_experiment_by_name("tiny-ui")
    names = [client.get_run(r["run_id"]).info.run_name for r in two_runs]
    assert len(set(names)) == 2
    model = client.get_registered_model("tiny-ui")
    expected = {str(v.version): set() for v in client.search_model_versions("name = 'tiny-ui'")}
    for alias, version in model.aliases.items():
        expected[str(version)].add(alias)
    assert expected == {"1": set(), "2": {"champion", "challenger"}} or \
        expected == {"1": {"champion"}, "2": {"challenger"}}, expected

    runs_page = browse(f"{ui}/#/experiments/{experiment.experiment_id}/runs", "experiment-runs",
                       tmp_path / "profile-runs")
    assert "tiny-ui" in runs_page and "Run Name" in runs_page, runs_page[:2000]
    for name in names:
        assert name in runs_page, f"run {name} not on the experiment page:\n{runs_page[:2000]}"

    model_page = browse(f"{ui}/#/models/tiny-ui", "registered-model", tmp_path / "profile-model")
    assert "Registered Models" in model_page, model_page[:2000]
    assert aliases_by_version(model_page) == expected, model_page[:3000]


def test_compare_view_shows_both_runs_metrics_and_the_recipe_key_that_differs(two_runs, project, ui, tmp_path):
    """As a person compares in the UI: the experiment's two latest flow runs in MLflow's compare view
    (the page its runs table opens with two rows ticked), which lists their metrics and params."""
    import json
    from urllib.parse import quote

    client = client_for(project)
    experiment = client.get_experiment_by_name("tiny-ui").experiment_id
    latest = [r for r in client.search_runs([experiment], order_by=["attributes.start_time DESC"])
              if "mlflow.parentRunId" not in r.data.tags][:2]
    assert {r.info.run_id for r in latest} == {r["run_id"] for r in two_runs}
    ids = [r.info.run_id for r in latest]
    page = browse(f"{ui}/#/compare-runs?runs={quote(json.dumps(ids))}&experiments={quote(json.dumps([experiment]))}",
                  "compare-runs", tmp_path / "profile-compare", height=2400)
    assert "Comparing 2 Runs" in page, page[:2000]
    for run in latest:
        assert run.info.run_name in page, f"{run.info.run_name} not in the compare view:\n{page[:3000]}"
    for metric in ("ppl", "size_mb", "decode_tps"):
        assert re.search(rf"\b{metric}\b", page), f"metric {metric} not in the compare view:\n{page[:3000]}"
    assert "stages.0.sparsity" in page, page[:3000]
    sparsities = {r.data.params["stages.0.sparsity"] for r in latest}
    assert sparsities == {"0.5", "0.4"}
    for value in sparsities:
        assert re.search(rf"\b{re.escape(value)}\b", page)
