"""Recent flow runs from the tracking store, as rows for `frugalflow runs` (flows/tables.py draws them)."""
from __future__ import annotations

from datetime import datetime, timezone

from mlflow import MlflowClient

from tasks.registry import version_by_alias

COLUMNS = ("run", "started", "recipe", "status", "verdict", "ppl", "size MB", "tok/s", "version")


def recent_runs(client: MlflowClient, model_name: str, limit: int = 10) -> list[dict]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="tags.`frugalflow.recipe` != ''",
                              order_by=["attributes.start_time DESC"], max_results=limit) if experiments else []
    champion = version_by_alias(client, model_name, "champion")
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        version = tags.get("frugalflow.registered_version", "")
        if champion and version == str(champion.version):
            version += " (champion)"
        rows.append({
            "run": run.info.run_id[:8],
            "started": datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "recipe": tags.get("frugalflow.recipe", "?"),
            "status": run.info.status,
            "verdict": tags.get("frugalflow.verdict", "-"),
            "ppl": metrics.get("candidate.ppl"),
            "size MB": metrics.get("candidate.size_mb"),
            "tok/s": metrics.get("candidate.decode_tps"),
            "version": version or "-",
        })
    return rows
