"""The nightly compression flow: data -> baseline -> stages -> evaluation -> gates -> registry.

    frugalflow run                 # the CLI wraps this
    frugalflow run --force         # register even when a version has this night's inputs
    python -m flows.nightly        # the same, without the CLI

A night whose candidate has the inputs key of a registered version (same final stage, evaluation
inputs and gates; tasks/unchanged.py) stops after the data step: its run is tagged
`frugalflow.verdict=unchanged` naming that version, and nothing is evaluated, logged or registered.

A failed night and a candidate that failed its gates send a message to the recipe's `notify`
destinations (flows/notifications.py: the flow's state hooks; tasks/notify.py: Prefect notification blocks).

Every night that ends, its run closed, applies the recipe's `retention` when enabled (flows/retention.py).

The recipe is validated once, here at the entry, before any heavy work; tasks get
paths, keys and frozen config models.
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone

import yaml
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.candidate import evaluate_baseline, evaluate_candidate, judge, publish, run_stages, unchanged_version
from flows.notifications import night_completed, night_failed
from flows.project import Project, open_project, project_root  # noqa: F401 (re-exported)
from flows.retention import night_retention
from frugalflow.recipe_io import flatten
from frugalflow.redact import redact
from tasks import tracking as T
from tasks.runstate import close_failed, process_tags


def start_parent_run(project: Project, name: str, tags: dict | None = None) -> T.Tracking:
    """The flow's MLflow run, tagged with lineage, source and the Prefect flow run; params, recipe and
    the prepared data splits (as MLflow datasets) logged."""
    client = T.connect(project.uri)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    recipe = project.recipe
    run = T.start_run(client, project.experiment_id, f"{name}-{stamp}",
                      tags={**project.run_tags, "prefect.flow_run_id": flow_run.id or "",
                            "frugalflow.recipe": recipe.name, "frugalflow.params": str(project.params_path),
                            **process_tags(), **(tags or {})})
    T.log_params(client, run, flatten(recipe))
    T.log_datasets(client, run, project.data_dir, project.data_key, recipe.stages)
    T.log_text(client, run, redact(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)), "recipe.yaml")
    return T.Tracking(uri=project.uri, experiment_id=project.experiment_id, parent_run_id=run)


NOT_REGISTERED = {"registered": False, "version": None, "champion": False}


@flow(name="frugalflow-nightly", log_prints=True, on_failure=[night_failed], on_completion=[night_completed])
def compression_flow(params: str = "params.yaml", overrides: list[str] | None = None, force: bool = False) -> dict:
    logger = get_run_logger()
    project = open_project(params, list(overrides or []))
    recipe = project.recipe
    logger.info("recipe %s: %d stages (%s) on %s; tracking %s", recipe.name, len(recipe.stages),
                " -> ".join(s.method for s in recipe.stages), project.device, redact(project.uri))
    tracking = start_parent_run(project, recipe.name)
    client = T.connect(project.uri)
    parent = tracking.parent_run_id
    try:
        same = unchanged_version(project, recipe, tracking, force)
        if same is not None:
            T.end_run(client, parent, "FINISHED")
            logger.info("run %s: unchanged: same inputs as version %s; nothing registered", parent, same["version"])
            return {"run_id": parent, "unchanged": same, "promotion": dict(NOT_REGISTERED), "lineage": project.lineage,
                    "retention": night_retention(recipe, project.uri, project.artifacts, parent)}
        baseline = evaluate_baseline(project)
        T.log_metrics(client, parent, {f"baseline.{k}": v for k, v in baseline.items()})
        stages = run_stages(project, recipe, tracking)
        model_dir = stages[-1]["dir"]
        candidate = evaluate_candidate(project, recipe, model_dir, tracking)
        verdict = judge(project, recipe, candidate, baseline, tracking)
        promotion = publish(project, recipe, model_dir, tracking, baseline=baseline, candidate=candidate,
                            stages=stages, verdict=verdict)
        T.end_run(client, parent, "FINISHED")
    except BaseException as exc:
        close_failed(client, parent, f"{type(exc).__name__}: {exc}")
        raise
    logger.info("run %s: verdict %s; %s", parent, "PASS" if verdict["passed"] else "FAIL",
                f"version {promotion['version']}{' (champion)' if promotion['champion'] else ''}"
                if promotion["registered"] else "not registered")
    return {"run_id": parent, "unchanged": None, "verdict": verdict, "promotion": promotion, "baseline": baseline,
            "candidate": candidate, "stages": stages, "lineage": project.lineage,
            "retention": night_retention(recipe, project.uri, project.artifacts, parent)}


if __name__ == "__main__":
    compression_flow(*sys.argv[1:2])
