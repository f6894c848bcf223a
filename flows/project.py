"""Where a flow run works: the project folder, its recipe, tracking store, data lineage and base model.

`open_project` does everything a run needs before the first heavy step, in this order,
failing early: find the project (the folder holding dvc.yaml), validate the recipe,
reach the MLflow store, then bring the DVC-versioned data and base model up to date.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.notifications import nights_crashed
from flows.secret_overrides import restore as restore_secrets
from frugalflow.config import Recipe, RecipeError
from frugalflow.recipe_io import RecipeSource, find_project_root, load_recipe
from frugalflow.stages import resolve_device
from tasks import tracking as T
from tasks.lineage import update_data
from tasks.preflight import preflight
from tasks.runstate import close_orphans
from tasks.stage_store import store_uri


def project_root(params_path: Path) -> Path:
    """The nearest folder at or above the recipe file that holds dvc.yaml."""
    root = find_project_root(params_path)
    if root is None:
        raise RecipeError(str(params_path), [f"no dvc.yaml at or above {params_path.parent}: run from a "
                                             "frugalflow project"])
    return root


@dataclass(frozen=True)
class Project:
    """One flow run's fixed surroundings, passed to the steps instead of a dozen arguments."""

    root: Path
    params_path: Path
    recipe: Recipe
    device: str
    uri: str
    experiment_id: str
    lineage: dict
    artifacts: Path
    base_dir: Path
    data_dir: Path
    base_key: str
    data_key: str
    stage_store: str | None = None  # tasks/stage_store.py: S3 prefix shared by workers, or None

    @property
    def lineage_tags(self) -> dict:
        return {"git_commit": self.lineage["git_commit"], "git_dirty": self.lineage["git_dirty"],
                **{f"dvc.{path}": md5 for path, md5 in self.lineage["dvc"].items()}}

    @property
    def run_tags(self) -> dict:
        """Lineage plus MLflow's source tags, for the runs a flow starts."""
        return {**self.lineage_tags, **T.source_tags(self.lineage, f"frugalflow {self.recipe.name}")}


def open_project(params: str, overrides: list[str], source: RecipeSource | None = None) -> Project:
    """`source`: the recipe file as the caller already read it (a sweep reads it once), else `params` is read."""
    source = source or RecipeSource.read(params)
    recipe = load_recipe(source, restore_secrets(overrides), checks="run")  # the same checks as `validate`
    params_path, root = source.path, source.root
    uri = T.resolve_uri(recipe.tracking.uri, root)
    client = preflight(root, uri)  # MLflow, S3 buckets, Prefect API: exit 4 before any work or record
    experiment = T.experiment_id(client, recipe.experiment_name, root / "mlartifacts")
    closed = close_orphans(client, [experiment])  # runs of killed processes: FAILED, with the reason
    nights_crashed(recipe, root, uri, client, closed)  # notify: a killed night ran no hook of its own
    lineage = update_data(str(root))
    return Project(root=root, params_path=params_path, recipe=recipe, device=resolve_device(recipe.device),
                   uri=uri, experiment_id=experiment, lineage=lineage, artifacts=root / recipe.artifacts_dir,
                   base_dir=root / recipe.base_model.path, data_dir=root / recipe.data.path,
                   base_key=lineage["dvc"].get(recipe.base_model.path, ""),
                   data_key=lineage["dvc"].get(recipe.data.path, ""), stage_store=store_uri())
