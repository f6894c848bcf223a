"""MLflow Model Registry: register passing candidates, move `champion`, keep its history.

A passing candidate becomes a new version with alias `challenger`; `promote` moves
`champion` and records when and why in the version's tags and in the registered model's
`champion_history` tag (newest last), which `rollback` walks back.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from frugalflow.errors import BadInput

from tasks.pyfunc import create_version

HISTORY_TAG = "champion_history"
HISTORY_LEN = 25
METRIC_KEYS = ("ppl", "size_mb", "decode_tps")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def version_by_alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_metrics(client: MlflowClient, name: str) -> dict | None:
    """The current champion's candidate metrics (from its run), or None if there is none."""
    version = version_by_alias(client, name, "champion")
    if version is None or not version.run_id:
        return None
    metrics = client.get_run(version.run_id).data.metrics
    found = {k: metrics[f"candidate.{k}"] for k in METRIC_KEYS if f"candidate.{k}" in metrics}
    return {**found, "version": str(version.version)} if found else None


def register_candidate(client: MlflowClient, name: str, run_id: str, source: str, tags: dict) -> str:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Compressed models produced by frugalflow")
    version = create_version(client, name, source, run_id, tags)  # resolves models:/<model_id> on this store
    client.set_registered_model_alias(name, "challenger", str(version.version))
    return str(version.version)


def history(client: MlflowClient, name: str) -> list[dict]:
    tags = client.get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def promote(client: MlflowClient, name: str, version: str, reason: str, by: str = "flow") -> dict:
    """Move `champion` to `version` and record the move; returns the history entry."""
    target = client.get_model_version(name, str(version))  # raises if it does not exist
    previous = version_by_alias(client, name, "champion")
    entry = {"version": str(target.version), "previous": str(previous.version) if previous else None,
             "at": _now(), "reason": reason, "by": by}
    client.set_registered_model_alias(name, "champion", str(target.version))
    client.set_model_version_tag(name, str(target.version), "champion_since", entry["at"])
    client.set_model_version_tag(name, str(target.version), "champion_reason", reason[:5000])
    moves = (history(client, name) + [entry])[-HISTORY_LEN:]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(moves))
    return entry


def rollback(client: MlflowClient, name: str, reason: str) -> dict:
    """Move `champion` back to the version that held it before the current one."""
    current = version_by_alias(client, name, "champion")
    if current is None:
        raise BadInput(f"registered model {name!r} has no champion to roll back")
    for entry in reversed(history(client, name)):
        if entry["version"] == str(current.version) and entry["previous"]:
            return promote(client, name, entry["previous"], f"rollback: {reason}", by="rollback")
    raise BadInput(f"no earlier champion recorded for {name!r} (current champion: version {current.version})")
