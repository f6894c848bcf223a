"""Retention: gather what the registry, the tracking store and `artifacts/stages/` hold, decide what may go
(frugalflow/retention.py) and delete it. `frugalflow gc` prints the plan and, without --dry-run, applies it;
the nightly flow applies it at its end when `retention.enabled` (flows/retention.py).

What changes between the plan and the deletion is looked at again:
- versions are deleted under the model's promotion lock, each read again first and skipped when by then
  it has an alias, the champion history names it or a running run adopted it;
- stage outputs: the running runs are read again just before; each output is taken under the lock that
  tasks/compress.py computes and reuses it under (held: skipped, in use), renamed aside, then removed, so
  no reader finds half of one;
- run files: `model/` and `serving/` of the run and the logged models it produced are deleted from the
  artifact store (a folder, S3 or a tracking server's); the run keeps its metrics, params, tags and other
  artifacts, and gets the tag `frugalflow.gc` saying when and why.
A nightly run names the stage outputs it will use in its tag `frugalflow.stage_dirs` before its first
stage (flows/candidate.py); while a frugalflow run that named none is running (a sweep, a run just
started), every stage output is kept. `.lock` files are never removed (a waiter may hold one open).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from prefect import get_run_logger, task

from frugalflow.config import RetentionConfig
from frugalflow.retention import Decision, Facts, RunFiles, Stage, Version, decide
from tasks import registry as R
from tasks.promotion_lock import promotion_lock
from tasks.runstate import why_orphaned

STAGE_DIRS = "frugalflow.stage_dirs"  # run tag: JSON list of the stage output folders the run uses
GC_TAG = "frugalflow.gc"  # run tag: when and why its model files were deleted
HEAVY = ("model", "serving")  # a run's artifacts that retention deletes (tasks/promote.py, tasks/serving.py)
TRASH = ".gc-"  # a stage entry renamed aside, being removed
STAGE_NAME = re.compile(r"^\d+-[A-Za-z0-9_]+-[0-9a-f]+$")


@dataclass
class Plan:
    """The decisions and where each thing to delete lives."""

    model_name: str
    stages_dir: Path
    decisions: list[Decision]
    stage_paths: dict[str, list[Path]] = field(default_factory=dict)  # output, checkpoint, quarantined, temporary
    run_files: dict[str, dict] = field(default_factory=dict)  # run id -> {"artifact_uri", "paths", "models"}
    version_runs: dict[str, list[str]] = field(default_factory=dict)  # version -> its runs
    version_stages: dict[str, list[str]] = field(default_factory=dict)  # version -> the stage outputs it uses
    trash: list[Path] = field(default_factory=list)  # entries an interrupted gc renamed aside

    @property
    def to_delete(self) -> list[Decision]:
        return [d for d in self.decisions if d.delete]

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.to_delete)


@dataclass
class Outcome:
    deleted: list[Decision] = field(default_factory=list)
    skipped: list[Decision] = field(default_factory=list)  # planned, not deleted: the reason says why

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.deleted)

    def summary(self) -> str:
        counts = {kind: sum(d.kind == kind for d in self.deleted) for kind in ("version", "stage", "run files")}
        text = (f"deleted {counts['version']} version(s), {counts['stage']} stage output(s), model files of "
                f"{counts['run files']} run(s): {self.bytes / 1e6:.1f} MB")
        return text + (f"; {len(self.skipped)} skipped" if self.skipped else "")


# --------------------------------------------------------------------------- reading the store
def _pages(call, **kw) -> list:
    found, token = [], None
    while True:
        page = call(max_results=1000, page_token=token, **kw)
        found += list(page)
        token = page.token
        if not token:
            return found


def _experiments(client) -> list[str]:
    return [e.experiment_id for e in _pages(client.search_experiments)]


def _live(run, now: float) -> bool:
    return run.info.status == "RUNNING" and why_orphaned(run.data.tags, now) is None


def _stage_name(run) -> str | None:
    """The stage output folder a stage run computed or reused."""
    tags = run.data.tags
    if tags.get("frugalflow.output_dir"):
        return Path(tags["frugalflow.output_dir"]).name
    index = (run.info.run_name or "").split("-")[0]
    if "frugalflow.key" in tags and "frugalflow.method" in tags and index.isdigit():
        return f"{index}-{tags['frugalflow.method']}-{tags['frugalflow.key']}"  # still computing
    return None


def running_stages(runs: list, now: float) -> tuple[dict[str, str], str | None]:
    """(stage name -> the running run that uses it, why no stage output may go now or None)."""
    named: dict[str, str] = {}
    hold = None
    for run in runs:
        tags, run_id = run.data.tags, run.info.run_id
        if not _live(run, now) or not any(k.startswith("frugalflow.") for k in tags):
            continue
        names = None
        if STAGE_DIRS in tags:
            try:
                names = [str(n) for n in json.loads(tags[STAGE_DIRS])]
            except (ValueError, TypeError):
                names = None
        elif "frugalflow.stage" in tags:
            names = [n for n in [_stage_name(run)] if n]
        if names is None:
            hold = hold or (f"run {run_id[:8]} ({run.info.run_name}) is running and has not named the stage "
                            "outputs it uses")
            continue
        for name in names:
            named.setdefault(name, run_id[:8])
    return named, hold


def _version_runs(version) -> list[str]:
    """The run that registered a version and the runs that adopted it (tasks/registry.py)."""
    killed = version.tags.get(R.KILLED_REGISTRATION, "").split(":")[0].strip()
    return list(dict.fromkeys(r for r in (version.run_id, killed, version.tags.get(R.ADOPTED_BY)) if r))


def _descendants(run_id: str, children: dict[str, list]) -> list:
    found, todo = [], [run_id]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.info.run_id)
    return found


def _versions(client, name: str, runs: dict, children: dict, now: float) -> tuple[list[Version], frozenset[str]]:
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return [], frozenset()
    aliases: dict[str, list[str]] = {}
    for alias, number in (model.aliases or {}).items():
        aliases.setdefault(str(number), []).append(alias)
    history = frozenset(str(e[k]) for e in R.history(client, name) for k in ("version", "previous") if e.get(k))
    versions = []
    for v in client.search_model_versions(f"name = '{name}'"):
        run_ids = _version_runs(v)
        stages = {v.tags[R.MODEL_KEY]} if v.tags.get(R.MODEL_KEY) else set()
        for run_id in run_ids:
            stages |= {n for d in _descendants(run_id, children) if (n := _stage_name(d))}
        versions.append(Version(int(v.version), tuple(aliases.get(str(v.version), ())), tuple(run_ids),
                                tuple(sorted(stages)), any(r in runs and _live(runs[r], now) for r in run_ids)))
    return versions, history


def _stage_groups(stages_dir: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """Entries under artifacts/stages/ by the stage output they belong to; and gc's own leftovers."""
    groups: dict[str, list[Path]] = {}
    trash = []
    for entry in sorted(stages_dir.iterdir()) if stages_dir.is_dir() else []:
        name = entry.name
        if name.startswith(TRASH):
            trash.append(entry)
            continue
        if name.endswith(".lock"):
            continue
        base = name
        if name.startswith(".") and ".tmp-" in name:
            base = name.lstrip(".").rsplit(".tmp-", 1)[0]
        elif name.endswith(".ckpt"):
            base = name[:-len(".ckpt")]
        elif ".corrupt-" in name:
            base = name.rsplit(".corrupt-", 1)[0]
        if STAGE_NAME.match(base):
            groups.setdefault(base, []).append(entry)
    return groups, trash


def disk_bytes(path: Path) -> int:
    """Bytes of the files at or under `path` (links not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if path.exists() or path.is_symlink() else 0
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(folder, f)).st_size for f in files)
    return total


def _artifact_bytes(repo, path: str | None = None) -> int:
    total = 0
    for info in repo.list_artifacts(path):
        total += _artifact_bytes(repo, info.path) if info.is_dir else (info.file_size or 0)
    return total


# --------------------------------------------------------------------------- the plan
def make_plan(client, model_name: str, artifacts: Path, cfg: RetentionConfig, now: float | None = None) -> Plan:
    """What retention would delete now, and why everything else is kept. `now` (Unix time; default the
    clock) is when ages are counted to; whether a run is running is always judged by the clock."""
    clock = time.time()
    now = clock if now is None else now
    experiments = _experiments(client)
    all_runs = _pages(client.search_runs, experiment_ids=experiments) if experiments else []
    runs = {r.info.run_id: r for r in all_runs}
    children: dict[str, list] = {}
    for run in all_runs:
        if run.data.tags.get("mlflow.parentRunId"):
            children.setdefault(run.data.tags["mlflow.parentRunId"], []).append(run)
    versions, history = _versions(client, model_name, runs, children, clock)
    running, hold = running_stages(all_runs, clock)

    stages_dir = artifacts / "stages"
    groups, trash = _stage_groups(stages_dir)
    last_use: dict[str, float] = {}
    for run in all_runs:
        if "frugalflow.stage" in run.data.tags and (name := _stage_name(run)) in groups:
            used = max(run.info.start_time or 0, run.info.end_time or 0) / 1000
            last_use[name] = max(last_use.get(name, 0.0), used)
    stages = [Stage(name, max([last_use.get(name, 0.0), *(p.lstat().st_mtime for p in paths)]),
                    sum(disk_bytes(p) for p in paths)) for name, paths in groups.items()]

    version_runs = {str(v.number): list(v.runs) for v in versions}
    version_stages = {str(v.number): list(v.stages) for v in versions}
    with_files = {r for rs in version_runs.values() for r in rs} | {
        r.info.run_id for r in all_runs if "frugalflow.candidate" in r.data.tags}
    models: dict[str, list] = {}
    for logged in (_pages(client.search_logged_models, experiment_ids=experiments) if experiments else []):
        if logged.source_run_id:
            models.setdefault(logged.source_run_id, []).append(logged)
    run_files, facts_runs = {}, []
    for run_id in sorted(with_files & set(runs)):
        run = runs[run_id]
        paths = [a.path for a in client.list_artifacts(run_id) if a.path in HEAVY]
        logged = [(m.model_id, m.artifact_location) for m in models.get(run_id, [])]
        if not paths and not logged:
            continue  # nothing heavy left (an earlier gc, a run that logged no model)
        run_files[run_id] = {"artifact_uri": run.info.artifact_uri, "paths": paths, "models": logged}
        ended = (run.info.end_time or run.info.start_time or 0) / 1000
        facts_runs.append(RunFiles(run_id, ended, 0, _live(run, clock)))

    facts = Facts(versions, history, stages, facts_runs, running, hold)
    decisions = decide(facts, cfg.keep_challengers, cfg.stage_days, cfg.run_days, now)
    decisions = [replace(d, bytes=_run_bytes(client, run_files[d.name])) if d.kind == "run files" and d.delete
                 else d for d in decisions]  # measured only for what goes
    return Plan(model_name, stages_dir, decisions, groups, run_files, version_runs, version_stages, trash)


def _run_bytes(client, where: dict) -> int:
    repo = get_artifact_repository(where["artifact_uri"], tracking_uri=client.tracking_uri)
    total = sum(_artifact_bytes(repo, path) for path in where["paths"])
    for _, location in where["models"]:
        total += _artifact_bytes(get_artifact_repository(location, tracking_uri=client.tracking_uri))
    return total


# --------------------------------------------------------------------------- applying it
def _delete_versions(client, plan: Plan, outcome: Outcome) -> set[str]:
    """Under the promotion lock; the versions not deleted after all."""
    kept = set()
    todo = [d for d in plan.to_delete if d.kind == "version"]
    if not todo:
        return kept
    now = time.time()
    with promotion_lock(client.tracking_uri, plan.model_name):
        history = {str(e[k]) for e in R.history(client, plan.model_name) for k in ("version", "previous") if e.get(k)}
        for d in todo:
            try:
                v = client.get_model_version(plan.model_name, d.name)
            except MlflowException:
                outcome.skipped.append(replace(d, reason="no longer exists"))
                kept.add(d.name)
                continue
            live = [r for r in _version_runs(v) if _run_is_live(client, r, now)]
            why = (f"alias {', '.join(v.aliases)} since the plan" if v.aliases else
                   "named by the champion history since the plan" if d.name in history else
                   f"its run {live[0][:8]} is running" if live else None)
            if why:
                outcome.skipped.append(replace(d, reason=why))
                kept.add(d.name)
                continue
            client.delete_model_version(plan.model_name, d.name)
            outcome.deleted.append(d)
    return kept


def _run_is_live(client, run_id: str, now: float) -> bool:
    try:
        return _live(client.get_run(run_id), now)
    except MlflowException:  # a run deleted from the store runs nothing
        return False


def _delete_stages(client, plan: Plan, kept_versions: set[str], outcome: Outcome) -> None:
    todo = [d for d in plan.to_delete if d.kind == "stage"]
    running: dict[str, str] = {}
    hold = None
    if todo:  # the running runs now, not at plan time
        open_runs = _pages(client.search_runs, experiment_ids=_experiments(client),
                           filter_string="attributes.status = 'RUNNING'")
        running, hold = running_stages(open_runs, time.time())
    spared = {s: n for n in kept_versions for s in plan.version_stages.get(n, [])}
    for d in todo:
        why = (hold or (f"used by running run {running[d.name]}" if d.name in running else None)
               or (f"used by version {spared[d.name]}, not deleted" if d.name in spared else None))
        if why:
            outcome.skipped.append(replace(d, reason=why))
            continue
        lock = FileLock(str(plan.stages_dir / d.name) + ".lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            outcome.skipped.append(replace(d, reason="in use (its lock is held)"))
            continue
        try:
            for entry in plan.stage_paths.get(d.name, []):
                _remove(entry)
        finally:
            lock.release()
        outcome.deleted.append(d)
    for entry in plan.trash:
        shutil.rmtree(entry, ignore_errors=True)


def _remove(entry: Path) -> None:
    """Rename aside (one atomic step out of readers' sight), then delete."""
    if not entry.exists() and not entry.is_symlink():
        return
    aside = entry.with_name(f"{TRASH}{entry.name}-{uuid.uuid4().hex[:6]}")
    os.rename(entry, aside)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    else:
        aside.unlink()


def _delete_run_files(client, plan: Plan, kept_versions: set[str], outcome: Outcome) -> None:
    spared = {r for n in kept_versions for r in plan.version_runs.get(n, [])}
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for d in (d for d in plan.to_delete if d.kind == "run files"):
        if d.name in spared:
            outcome.skipped.append(replace(d, reason="its version was not deleted"))
            continue
        where = plan.run_files[d.name]
        repo = get_artifact_repository(where["artifact_uri"], tracking_uri=client.tracking_uri)
        for path in where["paths"]:
            repo.delete_artifacts(path)
        for model_id, location in where["models"]:
            get_artifact_repository(location, tracking_uri=client.tracking_uri).delete_artifacts()
            client.delete_logged_model(model_id)
        gone = [f"{p}/" for p in where["paths"]] + [f"logged model {m}" for m, _ in where["models"]]
        client.set_tag(d.name, GC_TAG, f"{at}: deleted {', '.join(gone)} ({d.reason})"[:5000])
        outcome.deleted.append(d)


def apply(client, plan: Plan) -> Outcome:
    """Delete what `plan` allows and is still allowed now: versions, then their runs' files, then stage outputs."""
    outcome = Outcome()
    kept = _delete_versions(client, plan, outcome)
    _delete_run_files(client, plan, kept, outcome)
    _delete_stages(client, plan, kept, outcome)
    return outcome


@task(name="retention")
def retention_task(uri: str, model_name: str, artifacts: str, cfg: RetentionConfig) -> dict:
    """The end of a night: plan and apply; {"summary", "deleted", "skipped", "bytes"}."""
    from tasks import tracking as T

    client = T.connect(uri)
    outcome = apply(client, make_plan(client, model_name, Path(artifacts), cfg))
    get_run_logger().info("retention: %s", outcome.summary())
    return {"summary": outcome.summary(), "bytes": outcome.bytes,
            "deleted": [f"{d.kind} {d.name}" for d in outcome.deleted],
            "skipped": [f"{d.kind} {d.name}: {d.reason}" for d in outcome.skipped]}
