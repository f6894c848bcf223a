"""Prefect task: compare a night's new champion with the champion it replaced (frugalflow/regression.py).

After a promotion, the move onto the new version in the registry's champion history names the version it
replaced; both versions' candidate metrics are read from their runs (the run that adopted a version
counts, as for promotion). Every metric worse than before by more than the recipe's tolerance
(`notify.regression_pct`) is recorded on the night's run (tag `frugalflow.champion_regressed`) and
returned, with both versions, their runs and their data versions (the DVC hash of the prepared data:
two champions measured on different data are not measured on the same windows, which the message says).
The nightly flow's completion hook turns a non-empty list into the `champion_regressed` message.
"""
from __future__ import annotations

from prefect import task

from frugalflow.regression import describe, regressions
from tasks import registry as R
from tasks import tracking as T

TAG = "frugalflow.champion_regressed"


@task(name="champion-regression")
def compare_with_previous(model_name: str, version: str, tolerances: dict[str, float], tracking: T.Tracking,
                          data_tag: str = "dvc.data") -> dict | None:
    """None when `version` replaced no champion (the first one) or is not the latest move; else
    {version, run_id, previous, previous_run_id, reason, regressions, data: {previous, new}}."""
    client = T.connect(tracking.uri)
    moves = R.history(client, model_name)
    if not moves or moves[-1]["version"] != str(version) or not moves[-1].get("previous"):
        return None
    move = moves[-1]
    previous = client.get_model_version(model_name, move["previous"])
    previous_run = R.candidate_run_id(previous)
    new = R.run_candidate_metrics(client, tracking.parent_run_id)
    old = R.run_candidate_metrics(client, previous_run)
    found = regressions(new, old, tolerances)
    data = {"previous": client.get_run(previous_run).data.tags.get(data_tag) if previous_run else None,
            "new": client.get_run(tracking.parent_run_id).data.tags.get(data_tag)}
    if found:
        T.set_tags(client, tracking.parent_run_id, {TAG: "; ".join(describe(r) for r in found)[:5000]})
    return {"version": str(version), "run_id": tracking.parent_run_id, "previous": move["previous"],
            "previous_run_id": previous_run, "reason": move.get("reason"), "regressions": found, "data": data}
