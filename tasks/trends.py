"""Prefect task: the last nights of an experiment and the champion's moves, read from MLflow, for the
report's trends section (frugalflow/trends.py draws and tabulates them) and the registered model's
description.

A night is a top-level nightly run of the experiment (tag `frugalflow.recipe`, not a sweep run), the
newest NIGHTS of them, oldest first: its start, status and verdict (`failed` for a run closed FAILED:
an exception, or a killed night closed by the next one), the version it registered or found unchanged,
its data version (the DVC hash of the prepared data, tag `dvc.<data path>`) and its candidate metrics.
For each night the champion after it is the version the registry's champion history names at the
night's end (rollbacks and hand promotions included), with that version's candidate metrics.

Links: every run is linked to its page in the MLflow UI: the tracking server's when the store is a
server, else the address `frugalflow ui` serves (FRUGALFLOW_UI_URL, default http://127.0.0.1:5000).
The registered model's description (markdown, rendered by the MLflow UI itself) links relatively
(`#/experiments/<id>/runs/<id>`), so it works on whatever host serves the UI.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task

from frugalflow.redact import redact
from frugalflow.trends import description_markdown
from tasks import registry as R
from tasks import tracking as T

NIGHTS = 30
UI_URL_ENV = "FRUGALFLOW_UI_URL"
UI_URL = "http://127.0.0.1:5000"
DESCRIPTION_CHARS = 5000  # MLflow's column for a registered model's description (enforced by PostgreSQL)


def ui_base(uri: str) -> str:
    """The MLflow UI's address for runs in store `uri` (no password)."""
    base = uri if uri.startswith(("http://", "https://")) else os.environ.get(UI_URL_ENV, UI_URL)
    return redact(base.rstrip("/"))


def _when(ms: int | None) -> datetime:
    return datetime.fromtimestamp(ms / 1000, timezone.utc) if ms else datetime.now(timezone.utc)


def _parse(at: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(at) if at else None
    except ValueError:
        return None


def nightly_runs(client: MlflowClient, experiment_id: str, n: int = NIGHTS) -> list:
    """The newest `n` top-level nightly runs (any status), oldest first."""
    runs = client.search_runs([experiment_id], "tags.`frugalflow.recipe` != ''", order_by=["attributes.start_time DESC"],
                              max_results=max(4 * n, 100))
    nights = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "frugalflow.sweep" not in r.data.tags]
    return list(reversed(nights[:n]))


def _verdict(run) -> str:
    if run.info.status == "FAILED":
        return "failed"
    if run.info.status == "RUNNING" and not run.data.tags.get("frugalflow.verdict"):
        return "running"
    return run.data.tags.get("frugalflow.verdict", "-")


def champion_at(moves: list[dict], when: datetime) -> str | None:
    """The version `champion` pointed at, at `when`, after the recorded moves."""
    version = None
    for move in moves:
        at = _parse(move.get("at"))
        if at is not None and at <= when:
            version = move["version"]
    return version


def collect(client: MlflowClient, experiment_id: str, model_name: str, uri: str, data_tag: str = "dvc.data",
            n: int = NIGHTS) -> dict:
    """{"nights": [...], "moves": [...], "champions": {version: {run_id, url, metrics}}, "experiment_id"}."""
    base = ui_base(uri)

    def url(run_id: str | None) -> str | None:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}" if run_id else None

    try:
        moves = R.history(client, model_name)
    except MlflowException:  # no registered model yet
        moves = []
    nights = []
    for run in nightly_runs(client, experiment_id, n):
        tags, metrics = run.data.tags, run.data.metrics
        ended = _when(run.info.end_time)
        nights.append({
            "run_id": run.info.run_id, "name": run.info.run_name, "url": url(run.info.run_id),
            "started": _when(run.info.start_time).isoformat(timespec="seconds"), "status": run.info.status,
            "verdict": _verdict(run), "data": tags.get(data_tag),
            "version": tags.get("frugalflow.registered_version") or tags.get("frugalflow.unchanged_version"),
            "metrics": {k[len("candidate."):]: v for k, v in metrics.items() if k.startswith("candidate.")},
            "champion": champion_at(moves, ended),  # a running night: the champion now
            "regressed": tags.get("frugalflow.champion_regressed"),
        })
    champions = {}
    for version in {night["champion"] for night in nights if night["champion"]}:
        try:
            run_id = R.candidate_run_id(client.get_model_version(model_name, version))
        except MlflowException:
            continue  # deleted since
        champions[version] = {"run_id": run_id, "url": url(run_id), "metrics": R.run_candidate_metrics(client, run_id)}
    for move in moves:
        move["url"] = champions.get(move["version"], {}).get("url")
    return {"experiment_id": experiment_id, "model": model_name, "nights": nights, "moves": moves,
            "champions": champions}


def relative(trends: dict) -> dict:
    """The same trends with run links relative to the MLflow UI (`#/experiments/...`), for its own pages."""
    def cut(url: str | None) -> str | None:
        return url[url.index("#/"):] if url and "#/" in url else url

    return {**trends, "nights": [{**n, "url": cut(n["url"])} for n in trends["nights"]],
            "moves": [{**m, "url": cut(m.get("url"))} for m in trends["moves"]],
            "champions": {v: {**c, "url": cut(c["url"])} for v, c in trends["champions"].items()}}


def describe_model(client: MlflowClient, trends: dict) -> str | None:
    """Set the registered model's description to the last nights and champion moves; the text, or None
    when the model is not registered yet."""
    try:
        client.get_registered_model(trends["model"])
    except MlflowException:
        return None
    text = description_markdown(relative(trends), DESCRIPTION_CHARS)
    client.update_registered_model(trends["model"], description=text)
    return text


@task(name="trends")
def night_trends(model_name: str, tracking: T.Tracking, data_tag: str = "dvc.data", n: int = NIGHTS) -> dict:
    """The trends of the experiment (`collect`), and the registered model's description updated from them.
    A query that fails is a warning: {} is returned and the night goes on."""
    logger = get_run_logger()
    client = T.connect(tracking.uri)
    try:
        trends = collect(client, tracking.experiment_id, model_name, tracking.uri, data_tag, n)
        described = describe_model(client, trends)
    except Exception as exc:  # noqa: BLE001 - a trend is never worth failing the night
        logger.warning("trends: not collected: %s: %s", type(exc).__name__, redact(str(exc)).splitlines()[0][:300])
        return {}
    logger.info("trends: %d nights, %d champion moves%s", len(trends["nights"]), len(trends["moves"]),
                "; registered model description updated" if described else "")
    return trends
