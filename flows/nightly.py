"""The nightly compression flow: data -> baseline -> stages -> evaluation -> gates -> registry.

    frugalflow run                 # the CLI wraps this
    python -m flows.nightly        # the same, without the CLI

The recipe is validated once, here at the entry, before any heavy work; tasks get
paths, keys and frozen config models.
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from frugalflow.config import RecipeError, apply_override, flatten, parse_override, read_yaml, recipe_from_dict
from frugalflow.report import build_report, to_markdown
from frugalflow.stages import resolve_device
from tasks import tracking as T
from tasks.compress import compress_stage
from tasks.evaluate import evaluate
from tasks.gate import gate
from tasks.lineage import update_data
from tasks.promote import register_and_promote
from tasks.pyfunc import log_pyfunc

DVC_OWNED = ("base_model", "data")  # read by the DVC stages straight from params.yaml


def project_root(params_path: Path) -> Path:
    """The nearest folder at or above the recipe file that holds dvc.yaml."""
    for folder in (params_path.parent, *params_path.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no dvc.yaml at or above {params_path.parent}: run from a frugalflow project")


def load_flow_recipe(params_path: Path, root: Path, overrides: list[str]):
    """The recipe, with `base_model` and `data` from the project's params.yaml (DVC reads them
    there): a recipe file may omit them, but may not contradict them, nor may overrides."""
    bad = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in DVC_OWNED]
    if bad:
        raise RecipeError("override", [f"{o}: {', '.join(DVC_OWNED)} are read by the DVC stages from "
                                       "params.yaml; edit the file instead of overriding" for o in bad])
    data = read_yaml(params_path)
    dvc_params = root / "params.yaml"
    if isinstance(data, dict) and params_path != dvc_params and dvc_params.is_file():
        shared = read_yaml(dvc_params)
        for key in DVC_OWNED:
            if key in data and data[key] != shared.get(key):
                raise RecipeError(str(params_path), [f"{key}: differs from {dvc_params}, which the DVC stages "
                                                     "read; remove it from the recipe or edit params.yaml"])
            if key in shared:
                data[key] = shared[key]
    for text in overrides:
        apply_override(data, *parse_override(text))
    return recipe_from_dict(data, str(params_path))


@flow(name="frugalflow-nightly", log_prints=True)
def compression_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    logger = get_run_logger()
    overrides = list(overrides or [])
    params_path = Path(params).resolve()
    root = project_root(params_path)
    recipe = load_flow_recipe(params_path, root, overrides)
    device = resolve_device(recipe.device)
    uri = T.resolve_uri(recipe.tracking.uri, root)
    client = T.connect(uri)  # fail before any heavy work when the store is unreachable
    experiment = T.experiment_id(client, recipe.experiment_name, root / "mlartifacts")
    logger.info("recipe %s: %d stages (%s) on %s; tracking %s", recipe.name, len(recipe.stages),
                " -> ".join(s.method for s in recipe.stages), device, uri)

    lineage = update_data(str(root))
    artifacts = root / recipe.artifacts_dir
    base_dir, data_dir = root / recipe.base_model.path, root / recipe.data.path
    base_key = lineage["dvc"].get(recipe.base_model.path, "")
    data_key = lineage["dvc"].get(recipe.data.path, "")
    lineage_tags = {"git_commit": lineage["git_commit"], "git_dirty": lineage["git_dirty"],
                    **{f"dvc.{path}": md5 for path, md5 in lineage["dvc"].items()}}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    parent = T.start_run(client, experiment, f"{recipe.name}-{stamp}",
                         tags={**lineage_tags, "prefect.flow_run_id": flow_run.id or "",
                               "frugalflow.recipe": recipe.name, "frugalflow.params": str(params_path)})
    tracking = T.Tracking(uri=uri, experiment_id=experiment, parent_run_id=parent)
    try:
        T.log_params(client, parent, flatten(recipe))
        T.log_text(client, parent, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False),
                   "recipe.yaml")
        baseline = evaluate(str(base_dir), str(data_dir), recipe.evaluation, str(artifacts), device, "base model")
        T.log_metrics(client, parent, {f"baseline.{k}": v for k, v in baseline.items()})

        current_dir, current_key, stages = str(base_dir), base_key, []
        for index, stage in enumerate(recipe.stages):
            result = compress_stage(stage, index, current_dir, current_key, data_dir=str(data_dir),
                                    data_key=data_key, teacher_dir=str(base_dir), artifacts_dir=str(artifacts),
                                    device=device, seed=recipe.seed,
                                    pruned=any(s.kind == "prune" for s in recipe.stages[:index]),
                                    tracking=tracking)
            stages.append({"method": stage.method, "kind": stage.kind, **result})
            current_dir, current_key = result["dir"], result["key"]

        candidate = evaluate(current_dir, str(data_dir), recipe.evaluation, str(artifacts), device, "candidate")
        T.log_metrics(client, parent, {f"candidate.{k}": v for k, v in candidate.items()})
        T.log_metrics(client, parent, {k: candidate[k] for k in ("ppl", "size_mb", "decode_tps", "sparsity",
                                                                  "bits_per_weight") if k in candidate})
        verdict = gate(candidate, baseline, recipe.gates, recipe.registry.objective, recipe.registry.model_name,
                       tracking)
        client.log_artifacts(parent, current_dir, "model")
        pyfunc = log_pyfunc(client, parent, current_dir) if verdict["passed"] else None  # servable model
        report = build_report(recipe.name, baseline, candidate, stages, verdict, lineage)
        T.log_json(client, parent, report, "report/evaluation.json")
        T.log_text(client, parent, to_markdown(report), "report/evaluation.md")
        promotion = register_and_promote(verdict, recipe.registry.model_name, lineage_tags, tracking,
                                         model_uri=pyfunc["model_uri"] if pyfunc else None)
        client.set_terminated(parent, "FINISHED")
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    logger.info("run %s: verdict %s; %s", parent, "PASS" if verdict["passed"] else "FAIL",
                f"version {promotion['version']}{' (champion)' if promotion['champion'] else ''}"
                if promotion["registered"] else "not registered")
    return {"run_id": parent, "verdict": verdict, "promotion": promotion, "baseline": baseline,
            "candidate": candidate, "stages": stages, "lineage": lineage}


if __name__ == "__main__":
    compression_flow(*sys.argv[1:2])
