"""A night whose inputs equal a registered version's: the key that names a candidate's inputs, and the
record of a run that found a version with its key already registered (flows/nightly.py).

The inputs key is a hash of
  - the final stage output's folder name, whose content key covers the base model, the data, every
    stage's config in order and the code each stage runs (tasks/compress.py);
  - what the evaluation reads besides the model: the data version, the evaluation settings, the
    prepared eval windows, the named sets' files and lm-eval's include folder (the parts of
    frugalflow/evaluate/suite.py `evaluation_key` that are not the model or the machine);
  - the gate configuration: `gates` and `registry.objective`.
Every version the flows register carries it as the tag `frugalflow.inputs_key` (tasks/promote.py),
and every nightly run as a tag of the same name. Code outside the library (tasks/, flows/) and the
machine are not in it: a new machine or a change there alone is still an unchanged night.
"""
from __future__ import annotations

from pathlib import Path

from frugalflow.config import Recipe, fingerprint
from tasks import registry as R
from tasks import tracking as T

UNCHANGED_VERSION = "frugalflow.unchanged_version"  # run tag: the version with the same inputs
UNCHANGED = "unchanged"  # the run's `frugalflow.verdict`
NOTE = "unchanged.md"


def evaluation_inputs(data_dir: Path, recipe: Recipe, root: Path) -> dict:
    """Hashes of the files an evaluation reads besides the model, and its settings."""
    from frugalflow.evaluate.harness import include_hash  # torch: not for `frugalflow runs`, which reads a tag here
    from frugalflow.evaluate.sets import set_inputs
    from frugalflow.evaluate.suite import hash_files

    cfg = recipe.evaluation
    return {"settings": cfg.model_dump(mode="json"), "eval": hash_files([Path(data_dir) / "eval.safetensors"]),
            "sets": {name: hash_files(set_inputs(name, spec, Path(data_dir), root)) for name, spec in cfg.sets.items()},
            "lm_eval": include_hash(cfg.lm_eval, root) if cfg.lm_eval is not None else None}


def inputs_key(final_stage: str, data_key: str, data_dir: Path, recipe: Recipe, root: Path) -> str:
    """The candidate's inputs key: equal keys, same model judged the same way."""
    return fingerprint(final_stage, data_key, evaluation_inputs(data_dir, recipe, root), recipe.gates,
                       recipe.registry.objective)


def record_unchanged(tracking: T.Tracking, model_name: str, version, key: str, final_stage: str) -> str:
    """Tag the run `unchanged`, naming the version with the same inputs, and log a short note; returns
    the note. Nothing else is logged: no evaluation, no model, no version."""
    client = T.connect(tracking.uri)
    number = str(version.version)
    note = (f"Unchanged inputs: same as {model_name} version {number} (run {R.candidate_run_id(version)}).\n\n"
            f"- inputs key `{key}`: final stage `{final_stage}` (base model, data, stages, library code), "
            "evaluation settings and files, gates and objective\n"
            "- nothing evaluated, logged or registered; `frugalflow run --force` registers anyway\n")
    T.set_tags(client, tracking.parent_run_id, {"frugalflow.verdict": UNCHANGED, UNCHANGED_VERSION: number,
                                                "frugalflow.verdict_reasons": f"same inputs as version {number}"})
    T.log_text(client, tracking.parent_run_id, note, NOTE)
    return note
