"""Where a flow run works: the project folder, its recipe, tracking store, data lineage and base model.

`open_project` does everything a run needs before the first heavy step, in this order,
failing early: find the project (the folder holding dvc.yaml), validate the recipe,
reach the MLflow store, then bring the DVC-versioned data and base model up to date.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from frugalflow.config import Recipe, RecipeError
from frugalflow.recipe_io import apply_override, parse_override, read_yaml, recipe_from_dict
from frugalflow.stages import resolve_device
from tasks import tracking as T
from tasks.lineage import update_data

DVC_OWNED = ("base_model", "data")  # read by the DVC stages straight from params.yaml


def project_root(params_path: Path) -> Path:
    """The nearest folder at or above the recipe file that holds dvc.yaml."""
    for folder in (params_path.parent, *params_path.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no dvc.yaml at or above {params_path.parent}: run from a frugalflow project")


def load_flow_recipe(params_path: Path, root: Path, overrides: list[str]) -> Recipe:
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

    @property
    def lineage_tags(self) -> dict:
        return {"git_commit": self.lineage["git_commit"], "git_dirty": self.lineage["git_dirty"],
                **{f"dvc.{path}": md5 for path, md5 in self.lineage["dvc"].items()}}


def open_project(params: str, overrides: list[str]) -> Project:
    params_path = Path(params).resolve()
    root = project_root(params_path)
    recipe = load_flow_recipe(params_path, root, overrides)
    uri = T.resolve_uri(recipe.tracking.uri, root)
    client = T.connect(uri)  # fail before any heavy work when the store is unreachable
    experiment = T.experiment_id(client, recipe.experiment_name, root / "mlartifacts")
    lineage = update_data(str(root))
    return Project(root=root, params_path=params_path, recipe=recipe, device=resolve_device(recipe.device),
                   uri=uri, experiment_id=experiment, lineage=lineage, artifacts=root / recipe.artifacts_dir,
                   base_dir=root / recipe.base_model.path, data_dir=root / recipe.data.path,
                   base_key=lineage["dvc"].get(recipe.base_model.path, ""),
                   data_key=lineage["dvc"].get(recipe.data.path, ""))
