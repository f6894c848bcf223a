"""Workers that share nothing but the stores (a sweep on a Dask cluster with a stage store).

The flow publishes its inputs, the base model and the data, to the stage store under their content
keys (`publish_inputs`); a worker rebuilds the project in its own working folder
(`$FRUGALFLOW_WORKDIR`, else its current folder, + `frugalflow-work/`), fetching those inputs from
the store once (`on_worker`); stage outputs move through the store as in tasks/compress.py, and
tracking goes to the recipe's MLflow server; the flow fetches each candidate's final stage back
into its own artifacts folder before it evaluates it (`bring_back`).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from flows.project import Project
from frugalflow.stages import resolve_device
from tasks import stage_store

WORKDIR_ENV = "FRUGALFLOW_WORKDIR"


def input_names(project: Project) -> dict[str, str]:
    return {"base": stage_store.input_name("model", project.base_key, project.base_dir),
            "data": stage_store.input_name("data", project.data_key, project.data_dir)}


def publish_inputs(project: Project) -> dict[str, str]:
    """Upload the base model and the data to the stage store unless it holds them; their names."""
    names = input_names(project)
    stage_store.publish_input(project.base_dir, names["base"], project.stage_store)
    stage_store.publish_input(project.data_dir, names["data"], project.stage_store)
    return names


def on_worker(project: Project, names: dict[str, str]) -> Project:
    """The flow's project as this worker sees it: its own folder, inputs fetched from the store, its
    own device."""
    home = Path(os.environ.get(WORKDIR_ENV) or os.getcwd()) / "frugalflow-work"
    inputs = home / "inputs"
    return replace(project, root=home, artifacts=home / "artifacts", device=resolve_device(project.recipe.device),
                   base_dir=stage_store.fetch_input(names["base"], project.stage_store, inputs),
                   data_dir=stage_store.fetch_input(names["data"], project.stage_store, inputs))


def bring_back(project: Project, stages: list[dict]) -> list[dict]:
    """`stages` as a worker returned them, with their folders under this project's artifacts; the
    final one (the candidate's model) fetched from the store and verified."""
    local = [{**s, "dir": str(project.artifacts / "stages" / Path(s["dir"]).name)} for s in stages]
    stage_store.ensure_local(Path(local[-1]["dir"]), project.stage_store, why=", which a worker reported finished")
    return local
