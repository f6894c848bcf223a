"""Prefect task: the run's report with plots, logged to MLflow and summarised on the flow run.

`publish_report` gathers the experiment's finished candidates (nightly parent runs and sweep
candidate runs tagged `frugalflow.candidate`, with a metric `ppl`), adds the current one, draws the plots
(frugalflow/plots.py), and logs under the parent run's `report/`: `report.json`,
`report.md` (plots linked as `plots/*.png`), `report.html` (self-contained) and
`plots/*.png`; with the report's `trends` (tasks/trends.py), one `plots/trend-<metric>.svg`
per metric. A Prefect markdown artifact on the flow run carries the summary and the Pareto table.
A plot or query that fails is logged as a warning and left out; it never fails the flow run.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from prefect import get_run_logger, task

from frugalflow import plots
from frugalflow import trends as TR
from frugalflow.report import summary_markdown, to_html, to_markdown
from tasks import tracking as T

METRICS = ("ppl", "size_mb", "decode_tps")
LOSS_PARTS = ("kl", "tsld", "ce", "hidden")  # loss terms the distill trainer reports per step
SHORT = (("sparsity", "{}"), ("pattern", "{}"), ("bits", "w{}"), ("group_size", "g{}"), ("steps", "{}st"))


def candidate_label(params: dict) -> str:
    """`magnitude 0.5 + rtn w4 g32 + kl 3st` from the flattened recipe params."""
    stages = {}
    for key, value in params.items():
        m = re.fullmatch(r"stages\.(\d+)\.(\w+)", key)
        if m:
            stages.setdefault(int(m.group(1)), {})[m.group(2)] = value
    parts = []
    for index in sorted(stages):
        st = stages[index]
        bits = [fmt.format(st[k]) for k, fmt in SHORT if st.get(k) not in (None, "", "None", "unstructured", "-1", -1)
                and not (k == "sparsity" and st.get("pattern", "unstructured") != "unstructured")]
        parts.append(" ".join([st.get("method", "?")] + bits))
    return " + ".join(parts) or "-"


def _candidate(run, metrics: dict | None = None) -> dict:
    m = run.data.metrics if metrics is None else metrics
    verdict = run.data.tags.get("frugalflow.verdict")
    out = {"run_id": run.info.run_id, "name": run.info.run_name, "label": candidate_label(run.data.params),
           "passed": {"pass": True, "fail": False}.get(verdict), "current": False}
    for key in METRICS:
        value = m.get(key, m.get(f"candidate.{key}"))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def experiment_candidates(client: MlflowClient, experiment_id: str, current_run_id: str, report: dict,
                          max_runs: int = 500) -> list[dict]:
    """The experiment's finished flow runs with a perplexity, newest first, then this run (still
    running) from the report's candidate metrics and verdict."""
    runs = client.search_runs([experiment_id], "attributes.status = 'FINISHED' and metrics.ppl > 0",
                              order_by=["attributes.start_time DESC"], max_results=max_runs)
    found = [_candidate(r) for r in runs  # nightly runs (top level) and sweep candidates (tagged)
             if ("mlflow.parentRunId" not in r.data.tags or "frugalflow.candidate" in r.data.tags)
             and r.info.run_id != current_run_id]
    current = _candidate(client.get_run(current_run_id), report["candidate"])
    current.update(current=True, passed=bool(report["verdict"]["passed"]))
    return found + [current]


def stage_layers(client: MlflowClient, stage: dict, tmp: Path) -> dict:
    """Per-linear stats of one stage: its stats.json in the output directory, else the copy
    logged on its stage run."""
    path = Path(stage.get("dir", "")) / "stats.json"
    if not path.is_file() and stage.get("run_id"):
        tmp.mkdir(parents=True, exist_ok=True)
        path = Path(client.download_artifacts(stage["run_id"], "stats.json", str(tmp)))
    return json.loads(path.read_text()).get("layers") or {}


def training_history(client: MlflowClient, stage: dict, experiment_id: str) -> dict[str, list[tuple[int, float]]]:
    """Per-step loss, parts and lr of a distill stage from MLflow. A cached stage logged no
    steps itself: they come from the stage run that computed the same output (same key)."""
    run_ids = [stage["run_id"]] if stage.get("run_id") else []
    if stage.get("cached") and stage.get("key"):
        earlier = client.search_runs([experiment_id], f"tags.`frugalflow.key` = '{stage['key']}' and "
                                     "tags.`frugalflow.cached` = 'False'", max_results=1,
                                     order_by=["attributes.start_time DESC"])
        run_ids += [r.info.run_id for r in earlier]
    for run_id in run_ids:
        history = {}
        for name in ("loss", "lr") + LOSS_PARTS:
            points = client.get_metric_history(run_id, name)
            if points:
                history[name] = sorted((p.step, p.value) for p in points)
        if history.get("loss"):
            return history
    return {}


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-")[:60] or "run"


def draw_plots(client: MlflowClient, report: dict, experiment_id: str, out: Path, logger) -> dict[str, Path]:
    """The report's PNGs under `out` ({key: path}), scratch files beside it; each failure is a
    warning, not an error."""
    images: dict[str, Path] = {}

    def attempt(key: str, draw, *args, **kwargs) -> None:
        try:
            path = draw(*args, **kwargs)
        except Exception as exc:  # a plot is never worth failing the run
            logger.warning("report: plot %s failed: %s: %s", key, type(exc).__name__, exc)
            return
        if path is not None:
            images[key] = Path(path)

    cands = report.get("candidates") or []
    current = next((i for i, c in enumerate(cands) if c.get("current")), None)
    attempt("ppl_vs_size", plots.plot_ppl_vs_size, cands, out / "ppl_vs_size.png", current, report["baseline"])
    attempt("ppl_vs_speed", plots.plot_ppl_vs_speed, cands, out / "ppl_vs_speed.png", current, report["baseline"])
    layered = []
    for index, stage in enumerate(report["stages"]):
        try:
            layers = stage_layers(client, stage, out.parent.parent / "stats")
        except Exception as exc:
            logger.warning("report: no per-layer stats for stage %d: %s: %s", index, type(exc).__name__, exc)
            continue
        layered.append({"name": f"{index} {stage.get('method', '?')}", "layers": layers})
    attempt("layer_errors", plots.plot_layer_errors, layered, out / "layer_errors.png")
    for index, stage in enumerate(report["stages"]):
        if stage.get("kind") == "distill":
            def draw_training(index=index, stage=stage):
                history = training_history(client, stage, experiment_id)
                return plots.plot_training(history, out / f"training-{index}.png",
                                           title=f"Distillation ({stage.get('method')}, stage {index})")
            attempt(f"training-{index}", draw_training)
    trends = report.get("trends") or {}
    for metric in TR.metrics(trends) if trends.get("nights") else []:
        attempt(f"trend-{metric}", plots.plot_trend, TR.series(trends, metric), metric, out / f"trend-{metric}.svg",
                title=TR.label(metric))
    return images


@task(name="publish-report")
def publish_report(report: dict, tracking: T.Tracking) -> dict:
    """Log the report with plots on the parent run and a summary artifact on the flow run.
    Returns {"artifacts": MLflow paths, "images": keys, "prefect_artifact": id or None,
    "candidates": how many}."""
    logger = get_run_logger()
    client = T.connect(tracking.uri)
    run_id = tracking.parent_run_id
    try:
        candidates = experiment_candidates(client, tracking.experiment_id, run_id, report)
    except Exception as exc:
        logger.warning("report: could not list the experiment's runs: %s: %s", type(exc).__name__, exc)
        candidates = []
    report = {**report, "candidates": candidates}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "report"
        (root / "plots").mkdir(parents=True)
        images = draw_plots(client, report, tracking.experiment_id, root / "plots", logger)
        (root / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (root / "report.md").write_text(to_markdown(report, images))
        (root / "report.html").write_text(to_html(report, images))
        client.log_artifacts(run_id, str(root), "report")
        logged = sorted(f"report/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if p.is_file())
    prefect_id = None
    try:
        from prefect.artifacts import create_markdown_artifact

        where = (f"Full report with plots: MLflow run `{run_id}`, artifacts `report/report.html` and "
                 "`report/report.md`.")
        prefect_id = create_markdown_artifact(key=f"{_slug(report['recipe'])}-report",
                                              markdown=summary_markdown(report, where),
                                              description=f"frugalflow report, MLflow run {run_id}")
    except Exception as exc:
        logger.warning("report: Prefect artifact not created: %s: %s", type(exc).__name__, exc)
    logger.info("report: %d candidates, plots %s, logged under report/ on run %s", len(candidates),
                ", ".join(images) or "none", run_id)
    return {"artifacts": logged, "images": list(images), "prefect_artifact": str(prefect_id) if prefect_id else None,
            "candidates": len(candidates)}
