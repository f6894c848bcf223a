"""Flow runs side by side (for `frugalflow compare RUN RUN ...`): recipe, stages, verdict,
baseline and candidate metrics, the ratios the gates use, the registered version and the
recipe keys whose values differ between the runs.

Runs are named by full id or by a prefix such as the 8 characters `frugalflow runs` prints.
"""
from __future__ import annotations

import re

from mlflow import MlflowClient

from frugalflow.errors import BadInput
from tasks.registry import version_by_alias
from tasks.run_table import version_cell

RUN_TAG = "frugalflow.recipe"  # set on every parent (flow) run, not on stage runs
FIELDS = (  # (row label, key in a compare row)
    ("recipe", "recipe"), ("started", "started"), ("status", "status"), ("stages", "stages"),
    ("verdict", "verdict"), ("baseline ppl", "baseline_ppl"), ("candidate ppl", "candidate_ppl"),
    ("ppl increase %", "ppl_increase_pct"), ("baseline size MB", "baseline_size_mb"),
    ("candidate size MB", "candidate_size_mb"), ("size reduction x", "size_reduction"),
    ("baseline tok/s", "baseline_tps"), ("candidate tok/s", "candidate_tps"), ("speedup x", "speedup"),
    ("version", "version"),
)
_HEX = re.compile(r"[0-9a-f]{1,32}")


def _experiments(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _flow_runs(client: MlflowClient, experiments: list[str], extra: str = "", limit: int = 10):
    if not experiments:
        return []
    query = f"tags.`{RUN_TAG}` != ''" + (f" and {extra}" if extra else "")
    return client.search_runs(experiments, filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=limit)


def _recent(client: MlflowClient, experiments: list[str], limit: int = 10) -> str:
    runs = _flow_runs(client, experiments, limit=limit)
    if not runs:
        return "no frugalflow runs recorded in this store"
    return "recent runs: " + ", ".join(f"{r.info.run_id[:8]} ({r.data.tags.get(RUN_TAG, '?')})" for r in runs)


def resolve_runs(client: MlflowClient, refs: list[str]) -> list:
    """The flow runs named by full ids or id prefixes, in the order given. BadInput (exit 2) naming the
    reference for one that matches no flow run (listing the recent ones) or several."""
    if not refs:
        raise BadInput("name at least one run (an id or its first characters, as `frugalflow runs` prints)")
    experiments = _experiments(client)
    runs = []
    for ref in refs:
        prefix = ref.strip().lower()
        if not _HEX.fullmatch(prefix):
            raise BadInput(f"{ref!r} is not a run id or id prefix (hex digits); {_recent(client, experiments)}")
        found = _flow_runs(client, experiments, f"attributes.run_id LIKE '{prefix}%'", limit=6)
        if not found:
            raise BadInput(f"no frugalflow run with id starting {prefix!r}; {_recent(client, experiments)}")
        if len(found) > 1:
            ids = ", ".join(r.info.run_id[:12] for r in found[:5])
            raise BadInput(f"{prefix!r} matches several runs ({ids}{', ...' if len(found) > 5 else ''}); "
                             "give more characters")
        runs.append(found[0])
    return runs


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def stages_of(params: dict) -> str:
    """`magnitude -> rtn -> kl` from params stages.0.method, stages.1.method, ..."""
    found = {}
    for key, value in params.items():
        m = re.fullmatch(r"stages\.(\d+)\.method", key)
        if m:
            found[int(m.group(1))] = value
    return " -> ".join(found[i] for i in sorted(found)) or "-"


def compare_runs(client: MlflowClient, refs: list[str], model_name: str | None = None) -> list[dict]:
    """One row per run (keys of FIELDS, plus `run`: the 8-character id), in the order given."""
    from datetime import datetime, timezone

    champion = version_by_alias(client, model_name, "champion") if model_name else None
    rows = []
    for run in resolve_runs(client, refs):
        tags, m = run.data.tags, run.data.metrics
        b_ppl, c_ppl = m.get("baseline.ppl"), m.get("candidate.ppl")
        b_mb, c_mb = m.get("baseline.size_mb"), m.get("candidate.size_mb")
        b_tps, c_tps = m.get("baseline.decode_tps"), m.get("candidate.decode_tps")
        increase = _ratio(c_ppl, b_ppl)
        rows.append({
            "run": run.info.run_id[:8],
            "recipe": tags.get(RUN_TAG, "?"),
            "started": datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "status": run.info.status,
            "stages": stages_of(run.data.params),
            "verdict": tags.get("frugalflow.verdict", "-"),
            "baseline_ppl": b_ppl, "candidate_ppl": c_ppl,
            "ppl_increase_pct": None if increase is None else (increase - 1.0) * 100.0,
            "baseline_size_mb": b_mb, "candidate_size_mb": c_mb, "size_reduction": _ratio(b_mb, c_mb),
            "baseline_tps": b_tps, "candidate_tps": c_tps, "speedup": _ratio(c_tps, b_tps),
            "version": version_cell(tags, champion),
            "params": dict(run.data.params),
        })
    return rows


def differing_params(rows: list[dict]) -> list[str]:
    """Recipe keys (flat MLflow params) whose values are not the same in every row, in recipe
    order with list indices compared as numbers (stages.2 before stages.10)."""
    keys = {k for r in rows for k in r.get("params", {})}
    differ = [k for k in keys if len({r.get("params", {}).get(k) for r in rows}) > 1]
    return sorted(differ, key=lambda k: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in k.split(".")])
