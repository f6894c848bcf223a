"""Retention for people and for the night: `frugalflow gc [--dry-run]` prints what retention deletes and why
everything else stays, then deletes it; `night_retention` applies it at the end of a night when the
recipe's `retention.enabled` (tasks/retention.py gathers, decides and deletes).

    frugalflow gc --dry-run                      # the plan: every version, stage output and run's model files
    frugalflow gc                                # the same, then deleted; exit 0
    frugalflow gc -s retention.stage_days=3      # another horizon for this once
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from prefect import get_run_logger

from frugalflow.config import Recipe, RecipeError
from frugalflow.recipe_io import load_recipe
from tasks import tracking as T
from tasks.retention import Outcome, Plan, apply, make_plan, retention_task

RUN_TAG = "frugalflow.retention"  # on the night's run: what its retention deleted, or why it failed


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}" if n else "-"


def render_plan(plan: Plan) -> str:
    from flows.tables import render

    rows = [["delete" if d.delete else "keep", d.kind, d.name, _mb(d.bytes), d.reason] for d in plan.decisions]
    return render(["action", "kind", "name", "MB", "reason"], rows) if rows else "nothing recorded or stored yet"


def render_outcome(outcome: Outcome) -> str:
    lines = [outcome.summary()]
    lines += [f"  skipped {d.kind} {d.name}: {d.reason}" for d in outcome.skipped]
    return "\n".join(lines)


def cmd_gc(params: str, overrides: list[str], tracking_uri: str | None, dry_run: bool) -> int:
    """The plan as a table, then (unless `dry_run`) what was deleted; 2 for a bad recipe. The store:
    `tracking_uri`, else MLFLOW_TRACKING_URI, else the recipe's; stage outputs: the recipe's artifacts_dir
    in its project."""
    try:
        recipe = load_recipe(params, overrides)  # the file and the overrides against the schema
    except RecipeError as exc:
        print(f"invalid recipe {exc}", file=sys.stderr)
        return 2
    params_path = Path(params).resolve()
    root = next((d for d in params_path.parents if (d / "dvc.yaml").is_file()), params_path.parent)  # the project
    client = T.connect(tracking_uri or T.resolve_uri(recipe.tracking.uri, root))
    plan = make_plan(client, recipe.registry.model_name, root / recipe.artifacts_dir, recipe.retention)
    print(render_plan(plan))
    gone = plan.to_delete
    if dry_run:
        print(f"dry run: would delete {len(gone)} item(s), {plan.bytes / 1e6:.1f} MB; nothing deleted")
        return 0
    print(render_outcome(apply(client, plan)))
    return 0


def _logger():
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run (tests, a notebook)
        return logging.getLogger("frugalflow")


def night_retention(recipe: Recipe, uri: str, artifacts: Path, run_id: str) -> dict | None:
    """At the end of a night (its run closed): plan and apply retention when `retention.enabled`; the result,
    also tagged on the run. A failure is a warning and the tag: the night's own result stands."""
    if not recipe.retention.enabled:
        return None
    try:
        result = retention_task(uri, recipe.registry.model_name, str(artifacts), recipe.retention)
    except Exception as exc:  # noqa: BLE001 - the night's model is registered; retention tries again tomorrow
        _logger().warning("retention failed, the night's result stands: %s: %s",
                                 type(exc).__name__, exc)
        result = {"summary": f"failed: {type(exc).__name__}: {exc}"[:4000], "bytes": 0, "deleted": [], "skipped": []}
    T.set_tags(T.connect(uri), run_id, {RUN_TAG: result["summary"]})
    return result
