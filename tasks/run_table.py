"""Recent flow runs from the tracking store, as rows for `frugalflow runs` (flows/tables.py draws them):
the candidate's perplexity, its change against the base on every evaluation set side by side (the
languages among them), size, speed and the version it registered."""
from __future__ import annotations

from datetime import datetime, timezone

from mlflow import MlflowClient

from tasks.registry import version_by_alias
from tasks.unchanged import UNCHANGED_VERSION

COLUMNS = ("run", "started", "recipe", "status", "verdict", "ppl", "size MB", "tok/s", "version")
SET_PREFIX = "candidate.ppl."


def columns_for(rows: list[dict]) -> tuple[str, ...]:
    """COLUMNS with, after ppl, one `<set> %` column per evaluation set any of the rows has
    (`eval %` first, then the named sets in the order first seen)."""
    sets = [c for r in rows for c in r if c.endswith(" %")]
    sets = list(dict.fromkeys(sets))
    at = COLUMNS.index("ppl") + 1
    return COLUMNS[:at] + tuple(sets) + COLUMNS[at:]


def set_changes(metrics: dict) -> dict[str, float]:
    """`<set> %` -> the candidate's perplexity change against the base model in percent, for the
    prepared eval split (`eval %`) and every named set the run evaluated."""
    out = {}
    for key, value in metrics.items():
        if key == "candidate.ppl" or key.startswith(SET_PREFIX):
            name = "eval" if key == "candidate.ppl" else key[len(SET_PREFIX):]
            base = metrics.get("baseline." + key[len("candidate."):])
            if base:
                out[f"{name} %"] = (value / base - 1) * 100
    return dict(sorted(out.items(), key=lambda kv: kv[0] != "eval %"))


def version_cell(tags: dict, champion) -> str:
    """The version a flow run registered (`3`), or the one it found with the same inputs (`same as 3`),
    marked `(champion)` when it is; `-` for neither."""
    same = tags.get(UNCHANGED_VERSION, "")
    version = tags.get("frugalflow.registered_version", "") or same
    if not version:
        return "-"
    if champion is not None and version == str(champion.version):
        version += " (champion)"
    return f"same as {version}" if same else version


def recent_runs(client: MlflowClient, model_name: str, limit: int = 10) -> list[dict]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="tags.`frugalflow.recipe` != ''",
                              order_by=["attributes.start_time DESC"], max_results=limit) if experiments else []
    champion = version_by_alias(client, model_name, "champion")
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        rows.append({
            "run": run.info.run_id[:8],
            "started": datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "recipe": tags.get("frugalflow.recipe", "?"),
            "status": run.info.status,
            "verdict": tags.get("frugalflow.verdict", "-"),
            "ppl": metrics.get("candidate.ppl"),
            "size MB": metrics.get("candidate.size_mb"),
            "tok/s": metrics.get("candidate.decode_tps"),
            "version": version_cell(tags, champion),
            **set_changes(metrics),
        })
    return rows
