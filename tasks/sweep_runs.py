"""A sweep's MLflow records: the sweep run's grid, baseline and outcome, one child run per candidate.

The sweep run holds `sweep/grid.json`, `baseline.*` metrics, `sweep/candidates.json`,
`sweep/summary.md` and the tags `frugalflow.selected` / `frugalflow.selected_run`; each
candidate's run (a child of the sweep run, tagged `frugalflow.sweep_run` and with its assignment
as `sweep.*` params) gets `frugalflow.pareto` / `frugalflow.selected` and ends FINISHED when it
was evaluated, FAILED with the reason otherwise.
"""
from __future__ import annotations

import json

from frugalflow.sweep import Candidate, summary_markdown
from tasks import tracking as T
from tasks.runstate import close_failed, process_tags


class SweepRuns:
    """The MLflow runs of one sweep, on the store at `tracking.uri`; `tracking` is the sweep run's."""

    def __init__(self, tracking: T.Tracking):
        self.sweep = tracking
        self.client = T.connect(tracking.uri)

    def log_grid(self, candidates: list[Candidate]) -> None:
        T.log_json(self.client, self.sweep.parent_run_id, {c.label: c.assignment for c in candidates},
                   "sweep/grid.json")

    def log_baseline(self, baseline: dict) -> None:
        T.log_metrics(self.client, self.sweep.parent_run_id, {f"baseline.{k}": v for k, v in baseline.items()})

    def start_candidate(self, candidate: Candidate, lineage_tags: dict) -> T.Tracking:
        """The candidate's run under the sweep run; sets `candidate.run_id` and returns its Tracking."""
        sweep_run = self.sweep.parent_run_id
        candidate.run_id = T.start_run(
            self.client, self.sweep.experiment_id, candidate.label, parent_run_id=sweep_run,
            tags={**lineage_tags, "frugalflow.recipe": candidate.recipe.name, "frugalflow.sweep_run": sweep_run,
                  "frugalflow.assignment": json.dumps(candidate.assignment), **process_tags()})
        T.log_params(self.client, candidate.run_id, {f"sweep.{k}": v for k, v in candidate.assignment.items()})
        return self.tracking(candidate)

    def tracking(self, candidate: Candidate) -> T.Tracking:
        return T.Tracking(uri=self.sweep.uri, experiment_id=self.sweep.experiment_id,
                          parent_run_id=candidate.run_id)

    def candidate_failed(self, candidate: Candidate) -> None:
        close_failed(self.client, candidate.run_id, candidate.error or "failed")

    def finish(self, candidates: list[Candidate], best: Candidate | None, objective: str) -> None:
        """Tag and close the evaluated candidates' runs, log the outcome on the sweep run, close it."""
        sweep_run = self.sweep.parent_run_id
        for c in candidates:
            if c.metrics is None:
                continue
            T.set_tags(self.client, c.run_id, {"frugalflow.pareto": c.pareto, "frugalflow.selected": c.selected})
            T.end_run(self.client, c.run_id, "FINISHED")
        T.log_json(self.client, sweep_run, [c.record() for c in candidates], "sweep/candidates.json")
        T.log_text(self.client, sweep_run, summary_markdown(candidates, objective), "sweep/summary.md")
        T.set_tags(self.client, sweep_run, {"frugalflow.selected": best.label if best else "none",
                                            "frugalflow.selected_run": best.run_id if best else ""})
        T.end_run(self.client, sweep_run, "FINISHED")

    def fail(self, candidates: list[Candidate], exc: BaseException) -> None:
        """The sweep itself failed: its run and every candidate run still open end FAILED."""
        close_failed(self.client, self.sweep.parent_run_id, f"{type(exc).__name__}: {exc}")
        for c in candidates:
            if c.run_id and c.metrics is None and c.error is None:
                close_failed(self.client, c.run_id, f"the sweep failed: {type(exc).__name__}")
