"""Sweeps: grids of recipe keys into candidates, and the choice among the evaluated candidates.

`expand_grid({"stages.0.sparsity": [0.1, 0.3], "stages.1.bits": [4, 8]})` gives the four
assignments in row-major order; `as_overrides` turns one into `KEY=VALUE` strings that the
recipe loader applies and validates like any other override. A `Candidate` is one grid point
and what became of it; `select` marks the Pareto front (ppl, size down; decode speed up) and
the front's best passing candidate by the registry objective.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from frugalflow.config import Recipe, RecipeError
from frugalflow.gates import rank
from frugalflow.pareto import pareto_front
from frugalflow.recipe_io import parse_scalar

FRONT = {"minimize": ("ppl", "size_mb"), "maximize": ("decode_tps",)}


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """`stages.0.sparsity=0.1,0.3` -> ("stages.0.sparsity", [0.1, 0.3]); values are YAML scalars (`2:4` stays a string)."""
    key, sep, raw = text.partition("=")
    values = [v.strip() for v in raw.split(",") if v.strip()] if sep else []
    if not key.strip() or not values:
        raise RecipeError("grid", [f"{text!r}: expected KEY=V1,V2,..., e.g. stages.0.sparsity=0.1,0.3"])
    return key.strip(), [parse_scalar(v) for v in values]


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def as_overrides(assignment: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in assignment.items()]


def label(assignment: dict[str, Any]) -> str:
    """A short readable name: the last part of each key with its value, e.g. `sparsity=0.3,bits=8`."""
    return ",".join(f"{key.split('.')[-1]}={value}" for key, value in assignment.items()) or "base"


@dataclass
class Candidate:
    """One grid point of a sweep: its assignment and validated recipe, then its MLflow run, its
    stages' results, metrics and gate verdict, or the error that stopped it."""

    label: str
    assignment: dict[str, Any]
    recipe: Recipe
    run_id: str | None = None
    stages: list[dict] = field(default_factory=list)
    metrics: dict | None = None
    verdict: dict | None = None
    error: str | None = None
    pareto: bool = False
    selected: bool = False

    @property
    def model_dir(self) -> str:
        return self.stages[-1]["dir"]

    @property
    def passed(self) -> bool | None:
        return self.verdict["passed"] if self.verdict else None

    def record(self) -> dict:
        """The candidate as a row of the sweep's candidates.json and the flow's result."""
        return {"label": self.label, "assignment": self.assignment, "metrics": self.metrics, "passed": self.passed,
                "pareto": self.pareto, "selected": self.selected, "run_id": self.run_id, "error": self.error}


def select(candidates: list[Candidate], objective: str) -> Candidate | None:
    """Mark the evaluated candidates on the Pareto front and, among those that passed their gates,
    the best by `objective` as selected; returns it (None when no front candidate passed)."""
    for c in candidates:
        c.pareto = c.selected = False
    done = [c for c in candidates if c.metrics is not None]
    for i in pareto_front([c.metrics for c in done], **FRONT):
        done[i].pareto = True
    passing = [c for c in done if c.pareto and c.passed]
    if not passing:
        return None
    best = passing[rank([{**c.metrics, "_row": k} for k, c in enumerate(passing)], objective)[0]["_row"]]
    best.selected = True
    return best


def summary_markdown(candidates: list[Candidate], objective: str) -> str:
    lines = [f"# Sweep: {len(candidates)} candidates (objective {objective})", "",
             "| candidate | ppl | size MB | decode tok/s | gates | Pareto front | selected |",
             "|---|---|---|---|---|---|---|"]
    for c in candidates:
        m = c.metrics or {}
        cells = [f"{m[k]:.3f}" if k in m else "-" for k in ("ppl", "size_mb", "decode_tps")]
        gates = "failed to run" if c.error else ("pass" if c.passed else "FAIL")
        lines.append(f"| {c.label} | {' | '.join(cells)} | {gates} | {'yes' if c.pareto else ''} | "
                     f"{'**yes**' if c.selected else ''} |")
    return "\n".join(lines) + "\n"
