"""Retention decisions: which registered versions, stage outputs and run model files to keep, and why.

Plain facts in (gathered from MLflow and the disk by tasks/retention.py, which also deletes), one
`Decision` per thing out, the first rule that applies giving its reason:

versions      keep: the champion; any other alias; named by the champion history (rollback walks it);
              its run still running; among the newest `keep_challengers`. Else delete.
stage outputs keep: used by a kept version (its final stage, a stage run under its runs); named by a
              running run (every one, while a running run has not said which it uses); last used
              within `stage_days`. Else delete.
run files     (model/, serving/, logged models) keep: a kept version's run; running; ended within
              `run_days`. Delete: the run of a deleted version, at once; other runs after `run_days`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DAY_S = 86400.0


@dataclass(frozen=True)
class Version:
    number: int
    aliases: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()  # the run that registered it, the runs that adopted it
    stages: tuple[str, ...] = ()  # the stage outputs its lineage points at (folder names)
    running: bool = False  # one of its runs is still running


@dataclass(frozen=True)
class Stage:
    name: str  # the folder name under artifacts/stages/: <index>-<method>-<content key>
    last_used: float  # Unix time
    bytes: int = 0


@dataclass(frozen=True)
class RunFiles:
    run_id: str
    ended: float  # Unix time it ended (started, for a run that never closed)
    bytes: int = 0
    running: bool = False


@dataclass(frozen=True)
class Facts:
    versions: list[Version] = field(default_factory=list)
    history: frozenset[str] = frozenset()  # version numbers the champion history names
    stages: list[Stage] = field(default_factory=list)
    runs: list[RunFiles] = field(default_factory=list)
    running_stages: dict[str, str] = field(default_factory=dict)  # stage name -> the running run that uses it
    hold: str | None = None  # why no stage output may go now (a running run that named none)


@dataclass(frozen=True)
class Decision:
    kind: str  # "version" | "stage" | "run files"
    name: str  # version number, stage folder name, run id
    delete: bool
    reason: str
    bytes: int = 0


def _days(seconds: float) -> str:
    return f"{seconds / DAY_S:.1f} days"


def decide_versions(versions: list[Version], history: frozenset[str], keep_challengers: int) -> list[Decision]:
    newest = {v.number for v in sorted(versions, key=lambda v: v.number, reverse=True)[:keep_challengers]}
    decisions = []
    for v in sorted(versions, key=lambda v: v.number):
        if "champion" in v.aliases:
            why = "champion"
        elif v.aliases:
            why = f"alias {', '.join(sorted(v.aliases))}"
        elif str(v.number) in history:
            why = "named by the champion history"
        elif v.running:
            why = "its run is running"
        elif v.number in newest:
            why = f"among the newest {keep_challengers}"
        else:
            why = None
        decisions.append(Decision("version", str(v.number), why is None,
                                  why or f"older than the newest {keep_challengers}, never champion, no alias"))
    return decisions


def decide_stages(stages: list[Stage], used: dict[str, str], running: dict[str, str], hold: str | None,
                  days: float, now: float) -> list[Decision]:
    """`used`: stage name -> the kept version that uses it; `running`: stage name -> the running run."""
    decisions = []
    for s in sorted(stages, key=lambda s: s.name):
        age = now - s.last_used
        if s.name in used:
            why = f"used by version {used[s.name]}"
        elif s.name in running:
            why = f"used by running run {running[s.name]}"
        elif hold:
            why = hold
        elif age <= days * DAY_S:
            why = f"last used {_days(age)} ago (keep {days:g})"
        else:
            why = None
        decisions.append(Decision("stage", s.name, why is None, why or f"unused by kept versions, last used "
                                                                      f"{_days(age)} ago (keep {days:g})", s.bytes))
    return decisions


def decide_runs(runs: list[RunFiles], kept: dict[str, str], deleted: dict[str, str], days: float,
                now: float) -> list[Decision]:
    """`kept` / `deleted`: run id -> the kept / deleted version it registered."""
    decisions = []
    for r in sorted(runs, key=lambda r: r.ended):
        age = now - r.ended
        if r.run_id in kept:
            why, delete = f"run of version {kept[r.run_id]}", False
        elif r.running:
            why, delete = "running", False
        elif r.run_id in deleted:
            why, delete = f"run of deleted version {deleted[r.run_id]}", True
        elif age <= days * DAY_S:
            why, delete = f"ended {_days(age)} ago (keep {days:g})", False
        else:
            why, delete = f"no kept version, ended {_days(age)} ago (keep {days:g})", True
        decisions.append(Decision("run files", r.run_id, delete, why, r.bytes))
    return decisions


def decide(facts: Facts, keep_challengers: int, stage_days: float, run_days: float, now: float) -> list[Decision]:
    """Every version, stage output and run's model files with keep or delete and the reason."""
    versions = decide_versions(facts.versions, facts.history, keep_challengers)
    by_number = {str(v.number): v for v in facts.versions}
    kept_runs: dict[str, str] = {}
    deleted_runs: dict[str, str] = {}
    used: dict[str, str] = {}
    for d in versions:
        v = by_number[d.name]
        for run in v.runs:
            (deleted_runs if d.delete else kept_runs).setdefault(run, d.name)
        if not d.delete:
            for stage in v.stages:
                used.setdefault(stage, d.name)
    deleted_runs = {r: n for r, n in deleted_runs.items() if r not in kept_runs}  # a run shared with a kept one
    return [*versions, *decide_stages(facts.stages, used, facts.running_stages, facts.hold, stage_days, now),
            *decide_runs(facts.runs, kept_runs, deleted_runs, run_days, now)]
