"""One candidate's life in a flow: its stages, its evaluation, its gates and its publication.

The nightly flow runs one candidate; the sweep flow runs many (stages in parallel through
the task runner, evaluations one at a time so that speed figures are not measured while
another candidate computes). Both record a candidate the same way: metrics `ppl`,
`size_mb`, `decode_tps`, ... (also as `candidate.*`) and the tag `frugalflow.candidate` on
its MLflow run, the gate verdict on the same run, the model directory as `model/`, and a registered
version's inputs key (tasks/unchanged.py). The nightly flow first looks for a version with its
candidate's inputs key (`unchanged_version`): found, the night records that and does nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from flows.project import Project
from flows.workspace import on_worker
from frugalflow.config import Recipe
from frugalflow.report import build_report
from tasks import registry as R
from tasks import tracking as T
from tasks.champion_check import compare_with_previous
from tasks.compress import compress_stage, stage_dir_names
from tasks.evaluate import decode_race, evaluate
from tasks.gate import gate
from tasks.promote import register_and_promote
from tasks.pyfunc import log_pyfunc
from tasks.report import publish_report
from tasks.retention import STAGE_DIRS
from tasks.trends import night_trends
from tasks.unchanged import inputs_key, record_unchanged

HEADLINE = ("ppl", "size_mb", "decode_tps", "decode_speedup", "sparsity", "bits_per_weight")


def run_stages(project: Project, recipe: Recipe, tracking: T.Tracking) -> list[dict]:
    """Every stage of `recipe` in order from the base model; each is a child run of the tracking run."""
    current_dir, current_key, stages = str(project.base_dir), project.base_key, []
    for index, stage in enumerate(recipe.stages):
        result = compress_stage(stage, index, current_dir, current_key, data_dir=str(project.data_dir),
                                data_key=project.data_key, teacher_dir=str(project.base_dir),
                                artifacts_dir=str(project.artifacts), device=project.device, seed=recipe.seed,
                                pruned=any(s.kind == "prune" for s in recipe.stages[:index]), tracking=tracking,
                                store=project.stage_store)
        stages.append({"method": stage.method, "kind": stage.kind, **result})
        current_dir, current_key = result["dir"], result["key"]
    return stages


@task(name="candidate-stages")
def candidate_stages(project: Project, recipe: Recipe, tracking: T.Tracking,
                     inputs: dict[str, str] | None = None) -> list[dict]:
    """`run_stages` as one task, so a sweep can submit candidates to the flow's task runner. With
    `inputs` (flows/workspace.py) the worker shares no folder with the flow: it works in its own
    and takes the base model and data from the stage store."""
    if inputs:
        project = on_worker(project, inputs)
    return run_stages(project, recipe, tracking)


def candidate_inputs_key(project: Project, recipe: Recipe, final_stage: str) -> str:
    """The inputs key (tasks/unchanged.py) of the candidate whose last stage writes `final_stage`."""
    return inputs_key(final_stage, project.data_key, project.data_dir, recipe, project.root)


def unchanged_version(project: Project, recipe: Recipe, tracking: T.Tracking, force: bool = False) -> dict | None:
    """Before any stage or evaluation: the run gets its candidate's inputs key as a tag, and the stage
    outputs it will use (`frugalflow.stage_dirs`: gc keeps them while it runs); when a
    registered version has the same key (and not `force`), the run is recorded as unchanged, naming
    that version (and the registered model's description of the last nights rewritten, tasks/trends.py),
    and {"version", "run_id", "inputs_key", "final_stage"} returned; else None."""
    names = stage_dir_names(project.base_key, project.data_key, recipe.stages)
    final = names[-1]
    key = candidate_inputs_key(project, recipe, final)
    client = T.connect(tracking.uri)
    T.set_tags(client, tracking.parent_run_id, {R.INPUTS_KEY: key, STAGE_DIRS: json.dumps(names),  # kept from gc
                                                **({"frugalflow.forced": True} if force else {})})
    version = None if force else R.version_with_inputs(client, recipe.registry.model_name, key)
    if version is None:
        return None
    record_unchanged(tracking, recipe.registry.model_name, version, key, final)
    night_trends(recipe.registry.model_name, tracking, f"dvc.{recipe.data.path}")  # the description lists this night
    return {"version": str(version.version), "run_id": R.candidate_run_id(version), "inputs_key": key,
            "final_stage": final}


def evaluate_baseline(project: Project) -> dict:
    return evaluate(str(project.base_dir), str(project.data_dir), project.recipe.evaluation,
                    str(project.artifacts), project.device, "base model")


def evaluate_candidate(project: Project, recipe: Recipe, model_dir: str, tracking: T.Tracking,
                       label: str = "candidate") -> dict:
    """Evaluate the candidate and record its metrics on its run. Its decode speed comes from a
    race against the base model in this evaluation (interleaved rounds), not from a cache."""
    metrics = evaluate(model_dir, str(project.data_dir), recipe.evaluation, str(project.artifacts),
                       project.device, label)
    if recipe.evaluation.decode_race_rounds:
        metrics = {**metrics, **decode_race(str(project.base_dir), model_dir, recipe.evaluation, project.device,
                                            label)}
    client = T.connect(tracking.uri)
    run = tracking.parent_run_id
    T.log_metrics(client, run, {f"candidate.{k}": v for k, v in metrics.items()})
    T.log_metrics(client, run, {k: metrics[k] for k in HEADLINE if k in metrics})
    T.set_tags(client, run, {"frugalflow.candidate": label})
    return metrics


def judge(project: Project, recipe: Recipe, candidate: dict, baseline: dict, tracking: T.Tracking) -> dict:
    return gate(candidate, baseline, recipe.gates, recipe.registry.objective, recipe.registry.model_name,
                tracking)


def publish(project: Project, recipe: Recipe, model_dir: str, tracking: T.Tracking, *, baseline: dict,
            candidate: dict, stages: list[dict], verdict: dict) -> dict:
    """Log the model (and, when it passed, the servable pyfunc), register and promote a passing
    candidate, compare a new champion with the one it replaced (`promotion["replaced"]`,
    tasks/champion_check.py), then log the report with its plots and the last nights' trends (also a
    Prefect artifact on the flow run; tasks/trends.py rewrites the registered model's description).
    Returns the promotion record."""
    client = T.connect(tracking.uri)
    run = tracking.parent_run_id
    T.log_dir(client, run, model_dir, "model")
    pyfunc = log_pyfunc(client, run, model_dir) if verdict["passed"] else None
    promotion = register_and_promote(verdict, recipe.registry.model_name, project.lineage_tags, tracking,
                                     model_uri=pyfunc["model_uri"] if pyfunc else None, model_dir=model_dir,
                                     inputs_key=candidate_inputs_key(project, recipe, Path(model_dir).name))
    data_tag = f"dvc.{recipe.data.path}"
    if promotion["champion"]:
        promotion = {**promotion, "replaced": compare_with_previous(recipe.registry.model_name, promotion["version"],
                                                                    recipe.notify.regression_pct, tracking, data_tag)}
    trends = night_trends(recipe.registry.model_name, tracking, data_tag)
    publish_report(build_report(recipe.name, baseline, candidate, stages, verdict, project.lineage, trends=trends),
                   tracking)
    return promotion
