"""Report plots, markdown/HTML rendering, and publish_report on a real MLflow sqlite store
inside a Prefect test harness (MLflow artifacts and the Prefect artifact read back)."""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from frugalflow import plots
from frugalflow.report import build_report, fronts, summary_markdown, to_html, to_markdown

ORANGE, RED = (255, 127, 14), (214, 39, 40)  # matplotlib tab:orange (front), tab:red (this run)
CANDS = [
    {"run_id": "aaaaaaaa11", "label": "a", "ppl": 10.0, "size_mb": 100.0, "decode_tps": 50.0, "passed": True},
    {"run_id": "bbbbbbbb22", "label": "b", "ppl": 12.0, "size_mb": 60.0, "decode_tps": 80.0, "passed": True},
    {"run_id": "cccccccc33", "label": "c", "ppl": 13.0, "size_mb": 70.0, "decode_tps": 60.0, "passed": False},
    {"run_id": "dddddddd44", "label": "d", "ppl": 20.0, "size_mb": 30.0, "decode_tps": 120.0, "passed": False},
    {"run_id": "eeeeeeee55", "label": "e", "ppl": 11.0, "size_mb": 90.0, "decode_tps": 40.0, "passed": True,
     "current": True},
]
BASE = {"ppl": 9.0, "size_mb": 260.0, "decode_tps": 30.0}
LINEARS = [f"model.layers.{i}.{n}" for i in range(3) for n in ("self_attn.q_proj", "mlp.down_proj")]


def layers(key: str, scale: float) -> dict:
    return {name: {key: scale * (1 + i), "sparsity": 0.5} for i, name in enumerate(LINEARS)}


def count_color(path: Path, rgb, tol: int = 12) -> int:
    img = Image.open(path).convert("RGB")
    return sum(1 for p in img.getdata() if all(abs(a - b) <= tol for a, b in zip(p, rgb)))


def assert_png(path, size=(800, 500)) -> None:
    path = Path(path)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(path).size == size


def sample_report(candidates=None) -> dict:
    verdict = {"passed": False, "reasons": ["ppl = 13 fails <= 12"], "objective": "ppl",
               "gates": [{"name": "ppl_increase_pct", "value": 22.2, "threshold": 25.0, "passed": True, "rule": "<="},
                         {"name": "size_reduction", "value": 2.9, "threshold": 2.0, "passed": True, "rule": ">="},
                         {"name": "ppl", "value": 11.0, "threshold": 10.5, "passed": False, "rule": "<="}]}
    stages = [{"method": "magnitude", "kind": "prune", "cached": False, "stats": {"seconds": 1.5, "sparsity": 0.5}},
              {"method": "rtn", "kind": "quantize", "cached": True, "stats": {"seconds": 0.2, "bits_per_weight": 4.5}}]
    return build_report("tiny|recipe", {**BASE, "sparsity": 0.0}, {"ppl": 11.0, "size_mb": 90.0, "decode_tps": 40.0},
                        stages, verdict, {"git_commit": "f" * 40, "git_dirty": True, "dvc": {"data": "d41d8c"}},
                        candidates)


# --------------------------------------------------------------------------- plots
def test_tradeoff_plots_mark_front_current_and_base(tmp_path):
    size = plots.plot_ppl_vs_size(CANDS, tmp_path / "size.png", current=4, baseline=BASE)
    speed = plots.plot_ppl_vs_speed(CANDS, tmp_path / "p" / "speed.png", current=4, baseline=BASE)
    for path in (size, speed):
        assert_png(path)
        assert count_color(path, ORANGE) > 200 and count_color(path, RED) > 100
    plain = plots.plot_ppl_vs_size(CANDS, tmp_path / "plain.png")
    assert count_color(plain, RED) == 0 and count_color(plain, ORANGE) > 200
    assert fronts(CANDS) == {"size": {0, 1, 3, 4}, "speed": {0, 1, 3}}


def test_plots_skip_when_nothing_to_plot(tmp_path):
    assert plots.plot_ppl_vs_size([], tmp_path / "a.png") is None
    assert plots.plot_ppl_vs_speed([{"ppl": 3.0, "size_mb": 1.0}], tmp_path / "b.png") is None
    assert plots.plot_layer_errors([{"name": "0 structured", "layers": {}}], tmp_path / "c.png") is None
    assert plots.plot_layer_errors([{"name": "x", "layers": {"l": {"sparsity": 0.5}}}], tmp_path / "d.png") is None
    assert plots.plot_training({"lr": [(1, 1e-4)]}, tmp_path / "e.png") is None
    assert list(tmp_path.iterdir()) == []


def test_layer_errors_pick_the_recorded_error(tmp_path):
    assert plots.layer_errors({"a": {"recon_error": 0.1, "rel_error": 0.3, "sparsity": 0.5}}) == \
        ("recon_error", {"a": 0.1})
    assert plots.layer_errors({"a": {"rtn_error": 0.2, "awq_error": 0.1}}) == ("awq_error", {"a": 0.1})
    assert plots.layer_errors({"a": {"rel_error": 0.3}, "b": {"rel_error": float("nan")}}) == ("rel_error", {"a": 0.3})
    stages = [{"name": "0 wanda", "layers": layers("recon_error", 0.01)},
              {"name": "1 gptq", "layers": {**layers("recon_error", 1.0), "model.layers.3.mlp.up_proj": {}}},
              {"name": "2 kl", "layers": {}}]
    path = plots.plot_layer_errors(stages, tmp_path / "layers.png")
    assert_png(path)


def test_training_plot(tmp_path):
    history = {"loss": [(s, 3.0 / s) for s in range(1, 31)], "lr": [(s, 1e-4 * s / 30) for s in range(1, 31)],
               "kl": [(s, 2.0 / s) for s in range(1, 31)], "grad_norm": [(1, 5.0)]}
    assert_png(plots.plot_training(history, tmp_path / "train.png"))
    assert_png(plots.plot_training({"loss": [(1, 2.0)]}, tmp_path / "one.png"))  # no lr, one step


# --------------------------------------------------------------------------- rendering
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("plots")
    return {"ppl_vs_size": plots.plot_ppl_vs_size(CANDS, out / "ppl_vs_size.png", 4, BASE),
            "layer_errors": plots.plot_layer_errors([{"name": "0 magnitude", "layers": layers("rel_error", .1)}],
                                                    out / "layer_errors.png"),
            "training-2": plots.plot_training({"loss": [(1, 2.0), (2, 1.0)]}, out / "training-2.png")}


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained(images):
    report = sample_report(CANDS)
    page = to_html(report, images)
    parsed = Collect()
    parsed.feed(page)
    assert len(parsed.imgs) == 3
    inlined = {img["src"] for img in parsed.imgs}
    assert inlined == {"data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in images.values()}
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing fetched from elsewhere
    text = " ".join(parsed.text)
    for gate in report["verdict"]["gates"]:
        assert gate["name"] in text
    assert "tiny|recipe" in text and "d41d8c" in text and "FAIL" in text and "eeeeeeee (this run)" in text
    assert parsed.tags.count("table") == 5  # metrics, gates, stages, candidates, lineage
    assert 'class="current"' in page and "<style>" in page


def test_markdown_links_plots_and_lists_candidates(images):
    report = sample_report(CANDS)
    md = to_markdown(report, images)
    for name in ("ppl_vs_size.png", "layer_errors.png", "training-2.png"):
        assert f"](plots/{name})" in md
    assert "(stage 2)" in md
    assert "| perplexity | 9.000 | 11.000 | 1.222 |" in md
    assert "| ppl | 11 | <= | 10.5 | FAIL |" in md
    assert md.splitlines()[0] == "# frugalflow run: tiny|recipe"
    rows = [line for line in md.splitlines() if re.match(r"\| \*{0,2}[a-e]{8}", line)]
    assert len(rows) == 5 and rows[0].startswith("| aaaaaaaa")  # best perplexity first
    assert "**eeeeeeee (this run)**" in md
    c_row = next(r for r in rows if r.startswith("| cccccccc"))
    assert c_row.endswith("| FAIL | - |")
    d_row = next(r for r in rows if r.startswith("| dddddddd"))
    assert d_row.endswith("| size, speed |")
    # without candidates or images: the old report, no candidate or plot sections
    bare = to_markdown(sample_report())
    assert "## Candidates" not in bare and "## Plots" not in bare and "## Gates" in bare


def test_summary_lists_only_front_and_this_run():
    md = summary_markdown(sample_report(CANDS), "see MLflow")
    assert "## Pareto front (5 candidates)" in md and md.rstrip().endswith("see MLflow")
    assert "cccccccc" not in md
    assert all(r in md for r in ("aaaaaaaa", "bbbbbbbb", "dddddddd", "eeeeeeee (this run)"))


# --------------------------------------------------------------------------- the task
@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def store(tmp_path: Path):
    """A sqlite store with three finished flow runs, one failed, one stage run with a ppl
    metric, a current (running) flow run and its stage runs: a prune stage whose stats live in
    its output dir, a quantize stage whose stats are only logged on its run, and a cached
    distill stage whose steps were logged by an earlier run with the same key."""
    from mlflow import MlflowClient

    from tasks import tracking as T

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("tiny", artifact_location=(tmp_path / "mlartifacts").as_uri())

    def flow_run(metrics: dict, verdict: str, status: str = "FINISHED", params: dict | None = None) -> str:
        run = T.start_run(client, exp, "tiny-run", tags={"frugalflow.recipe": "tiny", "frugalflow.verdict": verdict})
        T.log_params(client, run, params or {"stages.0.method": "magnitude", "stages.0.sparsity": 0.5,
                                             "stages.0.pattern": "unstructured"})
        T.log_metrics(client, run, {**metrics, **{f"baseline.{k}": v for k, v in BASE.items()}})
        if status:
            client.set_terminated(run, status)
        return run

    old = [flow_run(dict(ppl=10.0, size_mb=100.0, decode_tps=50.0), "pass"),
           flow_run(dict(ppl=12.0, size_mb=60.0, decode_tps=80.0), "pass"),
           flow_run(dict(ppl=20.0, size_mb=30.0, decode_tps=120.0), "fail")]
    flow_run(dict(ppl=1.0, size_mb=1.0, decode_tps=1000.0), "pass", status="FAILED")
    child = T.start_run(client, exp, "0-prune", parent_run_id=old[0])
    T.log_metrics(client, child, {"ppl": 0.5, "size_mb": 0.5})
    client.set_terminated(child)
    earlier = T.start_run(client, exp, "2-distill-kl", parent_run_id=old[0],
                          tags={"frugalflow.key": "k-distill", "frugalflow.cached": "False"})
    for step in range(1, 7):
        T.log_metrics(client, earlier, {"loss": 4.0 / step, "lr": 1e-4 * step / 6, "kl": 3.0 / step}, step=step)
    client.set_terminated(earlier)

    current = flow_run({}, "fail", status=None, params={"stages.0.method": "magnitude", "stages.0.sparsity": 0.5,
                                                        "stages.1.method": "rtn", "stages.1.bits": 4,
                                                        "stages.1.group_size": 32, "stages.2.method": "kl",
                                                        "stages.2.steps": 6})
    prune_dir = tmp_path / "stages" / "0-magnitude"
    prune_dir.mkdir(parents=True)
    (prune_dir / "stats.json").write_text(json.dumps({"layers": layers("rel_error", 0.1), "seconds": 1.0}))
    quant_run = T.start_run(client, exp, "1-quantize-rtn", parent_run_id=current)
    T.log_json(client, quant_run, {"layers": layers("rel_error", 0.02)}, "stats.json")
    distill_run = T.start_run(client, exp, "2-distill-kl", parent_run_id=current,
                              tags={"frugalflow.key": "k-distill", "frugalflow.cached": "True"})
    report = sample_report()
    report["stages"] = [
        {"method": "magnitude", "kind": "prune", "dir": str(prune_dir), "run_id": "", "cached": False, "stats": {}},
        {"method": "rtn", "kind": "quantize", "dir": str(tmp_path / "gone"), "run_id": quant_run, "cached": False,
         "stats": {}},
        {"method": "kl", "kind": "distill", "dir": str(tmp_path / "gone2"), "run_id": distill_run, "key": "k-distill",
         "cached": True, "stats": {}}]
    return client, T.Tracking(uri=uri, experiment_id=exp, parent_run_id=current), report, old


def run_in_flow(report, tracking):
    from prefect import flow
    from prefect.runtime import flow_run

    from tasks.report import publish_report

    @flow(name="report-test")
    def f():
        return flow_run.id, publish_report(report, tracking)

    return f()


def read_prefect_artifacts(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_publish_report_logs_artifacts_and_prefect_summary(harness, tmp_path):
    client, tracking, report, old = store(tmp_path)
    flow_run_id, result = run_in_flow(report, tracking)
    assert flow_run_id
    run = tracking.parent_run_id
    assert result["images"] == ["ppl_vs_size", "ppl_vs_speed", "layer_errors", "training-2"]
    assert result["candidates"] == 4  # three finished flow runs + this one
    listed = {a.path for a in client.list_artifacts(run, "report")}
    assert listed == {"report/report.json", "report/report.md", "report/report.html", "report/plots"}
    pngs = {a.path: a.file_size for a in client.list_artifacts(run, "report/plots")}
    assert set(pngs) == {f"report/plots/{k}.png" for k in result["images"]} and all(s > 5000 for s in pngs.values())
    local = Path(client.download_artifacts(run, "report", str(tmp_path / "dl")))
    for png in (local / "plots").iterdir():
        assert_png(png)
    md = (local / "report.md").read_text()
    assert all(f"](plots/{k}.png)" in md for k in result["images"])
    assert "magnitude 0.5 + rtn w4 g32 + kl 6st" in md
    page = (local / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "ppl_increase_pct" in page
    saved = json.loads((local / "report.json").read_text())
    assert {c["run_id"] for c in saved["candidates"]} == {*old, run}
    assert [c["run_id"] for c in saved["candidates"] if c["current"]] == [run]

    artifacts = [a for a in read_prefect_artifacts("tiny-recipe-report") if str(a.flow_run_id) == str(flow_run_id)]
    assert len(artifacts) == 1 and str(artifacts[0].id) == result["prefect_artifact"]
    art = artifacts[0]
    assert art.type == "markdown" and art.task_run_id is not None
    assert "Pareto front (4 candidates)" in art.data and f"{run[:8]} (this run)" in art.data
    assert "ppl_increase_pct" in art.data and run in art.data


def test_a_failing_plot_does_not_fail_the_report(harness, tmp_path, monkeypatch):
    client, tracking, report, _ = store(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("no canvas")

    monkeypatch.setattr(plots, "plot_ppl_vs_speed", broken)
    report["stages"][1]["run_id"] = "0" * 32  # stats neither on disk nor logged: skipped with a warning
    _, result = run_in_flow(report, tracking)
    assert result["images"] == ["ppl_vs_size", "layer_errors", "training-2"]
    listed = {a.path for a in client.list_artifacts(tracking.parent_run_id, "report/plots")}
    assert listed == {"report/plots/ppl_vs_size.png", "report/plots/layer_errors.png",
                      "report/plots/training-2.png"}
    assert {a.path for a in client.list_artifacts(tracking.parent_run_id, "report")} >= {"report/report.html"}
