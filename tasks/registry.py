"""MLflow Model Registry: register passing candidates, move `champion`, keep its history.

A passing candidate becomes a new version with alias `challenger`; `promote` moves
`champion` and records when and why in the version's tags and in the registered model's history,
one tag per move (`champion_history.000001`, ...: no length limit; older releases kept one
`champion_history` tag, read first), which `rollback` walks back. Under the lock, before any
move, `reconcile` records a champion the history does not name (a promotion killed between moving
the alias and recording it, or a move made outside frugalflow), so the history always ends at the
alias. Every move of `champion`
happens under the model's promotion lock (tasks/promotion_lock.py), and `promote_if_better`
decides "beats the champion" under it, from the metrics recorded on both versions' runs, so
racing promotions leave the best candidate champion and every move in the history.

A run killed between creating (or adopting) its version and finishing (tasks/runstate.py tags that
version `frugalflow.run_failed`) leaves a version that may already carry `challenger` or `champion`.
The rerun of the same candidate (same final stage output, tag `frugalflow.model_key`) adopts that
version instead of creating a second one: the version gets the rerun's tags and
`frugalflow.adopted_by_run`, and its metrics are read from the adopting run from then on
(tests/test_registry_random_kills.py kills the phase at random instants until every write was hit).

Every version also carries its candidate's inputs key (`frugalflow.inputs_key`, tasks/unchanged.py):
a nightly run whose key a version already has registers nothing (`version_with_inputs`).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from frugalflow.errors import BadInput
from frugalflow.gates import beats, objective_value
from tasks.promotion_lock import promotion_lock
from tasks.pyfunc import create_version

HISTORY_TAG = "champion_history"  # older releases: one JSON list of the last 25 moves
HISTORY_PREFIX = "champion_history."  # one tag per move, numbered from 1 after the legacy list
METRIC_KEYS = ("ppl", "size_mb", "decode_tps")
MODEL_KEY = "frugalflow.model_key"  # the final stage output's content key: same key, same model
INPUTS_KEY = "frugalflow.inputs_key"  # model key + evaluation inputs + gates (tasks/unchanged.py)
RUN_FAILED = "frugalflow.run_failed"  # set by tasks/runstate.py on versions of killed runs
ADOPTED_BY = "frugalflow.adopted_by_run"
KILLED_REGISTRATION = "frugalflow.registered_by_killed_run"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def version_by_alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def candidate_run_id(version) -> str | None:
    """The run whose evaluation a version stands for: the run that adopted it, else its own run."""
    return version.tags.get(ADOPTED_BY) or version.run_id


def champion_metrics(client: MlflowClient, name: str) -> dict | None:
    """The current champion's candidate metrics (from its run), or None if there is none."""
    version = version_by_alias(client, name, "champion")
    if version is None or not candidate_run_id(version):
        return None
    metrics = client.get_run(candidate_run_id(version)).data.metrics
    found = {k: metrics[f"candidate.{k}"] for k in METRIC_KEYS if f"candidate.{k}" in metrics}
    return {**found, "version": str(version.version)} if found else None


def killed_registration(client: MlflowClient, name: str, model_key: str | None):
    """The version of `name` registered for the model `model_key` whose run (the one that created or
    last adopted it) was killed before finishing (`RUN_FAILED`, set by tasks/runstate.py), or None.
    Aliases do not matter: a run killed after moving `challenger` or `champion` onto its version
    leaves that version to its rerun, not a second one."""
    if not model_key:
        return None
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get(MODEL_KEY) == model_key and RUN_FAILED in version.tags:
            return version
    return None


def version_with_inputs(client: MlflowClient, name: str, inputs_key: str):
    """The newest version of `name` registered for the inputs `inputs_key`, or None. A version a killed
    run left (`frugalflow.run_failed`) does not count: the rerun adopts it (`register_candidate`)."""
    query = f"name = '{name}' and tags.`{INPUTS_KEY}` = '{inputs_key}'"
    found = [v for v in client.search_model_versions(query) if RUN_FAILED not in v.tags]
    return max(found, key=lambda v: int(v.version), default=None)


def _adopt(client: MlflowClient, version, run_id: str, tags: dict) -> None:
    """Make a killed run's version the version of `run_id`, keeping the record of who created it."""
    name, number = version.name, str(version.version)
    killed = version.tags.get(ADOPTED_BY) or version.run_id
    client.set_model_version_tag(name, number, KILLED_REGISTRATION, f"{killed}: {version.tags[RUN_FAILED]}"[:5000])
    for key, value in {**tags, ADOPTED_BY: run_id}.items():
        client.set_model_version_tag(name, number, key, str(value)[:5000])
    client.delete_model_version_tag(name, number, RUN_FAILED)


def register_candidate(client: MlflowClient, name: str, run_id: str, source: str, tags: dict) -> str:
    """A new version of `name` (created if missing) with alias `challenger`, under the promotion
    lock: the registry's alias writes are not safe against concurrent writers. A version a killed
    run registered for the same model (`tags[MODEL_KEY]`) is adopted instead of duplicated."""
    with promotion_lock(client.tracking_uri, name):
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="Compressed models produced by frugalflow")
        version = killed_registration(client, name, tags.get(MODEL_KEY))
        if version is not None:
            _adopt(client, version, run_id, tags)
        else:
            version = create_version(client, name, source, run_id, tags)  # resolves models:/<model_id> here
        client.set_registered_model_alias(name, "challenger", str(version.version))
    return str(version.version)


def history(client: MlflowClient, name: str) -> list[dict]:
    """Every recorded move of `champion`, oldest first."""
    tags = client.get_registered_model(name).tags
    moves = [(k, v) for k, v in tags.items() if k.startswith(HISTORY_PREFIX)]
    return json.loads(tags.get(HISTORY_TAG, "[]")) + [json.loads(v) for _, v in sorted(moves)]


def _record(client: MlflowClient, name: str, entry: dict) -> None:
    entry = {**entry, "reason": entry["reason"][:2000]}  # a tag value holds 5000 characters
    client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{len(history(client, name)) + 1:06d}", json.dumps(entry))


def reconcile(client: MlflowClient, name: str) -> dict | None:
    """(Under the promotion lock.) When `champion` points at a version the last recorded move does not
    name, record that move now; the entry, or None when the history already agrees."""
    current = version_by_alias(client, name, "champion")
    moves = history(client, name)
    last = moves[-1]["version"] if moves else None
    if current is None or str(current.version) == last:
        return None
    entry = {"version": str(current.version), "previous": last, "at": _now(), "by": "reconcile",
             "reason": f"champion found at version {current.version} with no recorded move onto it (a promotion "
                       "interrupted between moving the alias and recording it, or a move outside frugalflow)"}
    _record(client, name, entry)
    return entry


def _version_list(client: MlflowClient, name: str) -> str:
    """'1, 2 (champion), 3' for a message; 'none' when the model has no version (or does not exist)."""
    champion = version_by_alias(client, name, "champion")
    try:
        numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        numbers = []
    marked = [f"{n} (champion)" if champion is not None and str(n) == str(champion.version) else str(n)
              for n in numbers]
    return ", ".join(marked) or "none"


def _move(client: MlflowClient, name: str, version: str, reason: str, by: str) -> dict:
    """Move `champion` to `version` and record the move (the caller holds the promotion lock)."""
    try:
        target = client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise BadInput(f"registered model {name!r} has no version {version!r}; "
                       f"its versions: {_version_list(client, name)}") from exc
    reconcile(client, name)
    previous = version_by_alias(client, name, "champion")
    entry = {"version": str(target.version), "previous": str(previous.version) if previous else None,
             "at": _now(), "reason": reason, "by": by}
    client.set_registered_model_alias(name, "champion", str(target.version))
    client.set_model_version_tag(name, str(target.version), "champion_since", entry["at"])
    client.set_model_version_tag(name, str(target.version), "champion_reason", reason[:5000])
    _record(client, name, entry)
    return entry


def promote(client: MlflowClient, name: str, version: str, reason: str, by: str = "flow") -> dict:
    """Move `champion` to `version` and record the move; returns the history entry. Promoting the
    current champion moves and records nothing (the entry returned has previous == version, at None)."""
    with promotion_lock(client.tracking_uri, name):
        current = version_by_alias(client, name, "champion")
        if current is not None and str(current.version) == str(version):
            return {"version": str(version), "previous": str(version), "at": None, "reason": reason, "by": by}
        return _move(client, name, version, reason, by)


def run_candidate_metrics(client: MlflowClient, run_id: str | None) -> dict:
    """The `candidate.*` metrics of a run, without the prefix (what gates and objectives read)."""
    if not run_id:
        return {}
    metrics = client.get_run(run_id).data.metrics
    return {k[len("candidate."):]: v for k, v in metrics.items() if k.startswith("candidate.")}


def promote_if_better(client: MlflowClient, name: str, version: str, objective: str, by: str = "flow") -> dict:
    """Under the promotion lock: make `version` champion when there is none or it beats the current
    one on `objective` (both read from their runs now, not at gate time). Returns
    {"promoted", "reason", "champion" (the version that is champion afterwards), "entry"}."""
    with promotion_lock(client.tracking_uri, name):
        reconcile(client, name)  # a run killed between moving the alias and recording it: recorded now
        mine = run_candidate_metrics(client, candidate_run_id(client.get_model_version(name, str(version))))
        current = version_by_alias(client, name, "champion")
        theirs = run_candidate_metrics(client, candidate_run_id(current)) if current is not None else None
        if current is not None and str(current.version) == str(version):
            return {"promoted": False, "reason": f"version {version} is already champion",
                    "champion": str(version), "entry": None}
        if not beats(mine, theirs, objective):
            return {"promoted": False, "champion": str(current.version), "entry": None,
                    "reason": f"{objective} {objective_value(mine, objective)} does not beat champion version "
                              f"{current.version} ({objective_value(theirs, objective)})"}
        reason = ("first passing candidate" if current is None else
                  f"{objective} {objective_value(mine, objective):.6g} better than champion version "
                  f"{current.version} ({objective_value(theirs, objective)})")
        entry = _move(client, name, version, reason, by)
        return {"promoted": True, "reason": reason, "champion": str(version), "entry": entry}


def rollback(client: MlflowClient, name: str, reason: str) -> dict:
    """Move `champion` back to the version that held it before the current one: the latest recorded
    move onto the current champion from another version (moves of a version onto itself, which
    older releases recorded, are passed over)."""
    with promotion_lock(client.tracking_uri, name):
        current = version_by_alias(client, name, "champion")
        if current is None:
            raise BadInput(f"registered model {name!r} has no champion to roll back")
        for entry in reversed(history(client, name)):
            if entry["version"] == str(current.version) and entry["previous"] not in (None, str(current.version)):
                return _move(client, name, entry["previous"], f"rollback: {reason}", by="rollback")
        raise BadInput(f"no earlier champion recorded for {name!r} (current champion: version {current.version})")
