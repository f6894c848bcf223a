"""Prefect task: the gate verdict for a candidate, recorded on the parent run.

MLflow: metrics `gate.<name>` (the value) and `gate.<name>.passed` (1/0) for every gate that
was evaluated (and `gate.ppl_increase_pct.<ppl set>` for each set the perplexity gate judged),
`gate.failed` / `gate.skipped` counts; tags `frugalflow.verdict`,
`frugalflow.verdict_reasons`, `frugalflow.gates_skipped` and `frugalflow.gate.<name>`
(pass | fail | skipped: reason) for every gate; the whole verdict as `verdict.json`.
"""
from __future__ import annotations

from mlflow import MlflowClient
from prefect import get_run_logger, task

from frugalflow.gates import describe, verdict
from tasks import registry as R
from tasks import tracking as T


def champion_all_metrics(client: MlflowClient, model_name: str) -> dict | None:
    """The champion's metrics: registry.champion_metrics plus every other `candidate.*` metric
    of its run (named sets' ppl, lm-eval scores, latencies), so champion gates and objectives
    on them see it."""
    champion = R.champion_metrics(client, model_name)
    if champion is None:
        return None
    version = R.version_by_alias(client, model_name, "champion")
    if version is not None and R.candidate_run_id(version):
        metrics = client.get_run(R.candidate_run_id(version)).data.metrics
        extra = {k[len("candidate."):]: v for k, v in metrics.items() if k.startswith("candidate.")}
        champion = {**extra, **champion}
    return champion


@task(name="gate")
def gate(candidate: dict, baseline: dict, gates, objective: str, model_name: str, tracking: T.Tracking) -> dict:
    logger = get_run_logger()
    client = T.connect(tracking.uri)
    champion = champion_all_metrics(client, model_name)
    result = verdict(candidate, baseline, gates, champion, objective)
    run = tracking.parent_run_id
    evaluated = [g for g in result["gates"] if g["status"] != "skipped"]
    T.log_metrics(client, run, {f"gate.{g['name']}": g["value"] for g in evaluated if g["value"] is not None})
    T.log_metrics(client, run, {f"gate.{g['name']}.passed": int(g["passed"]) for g in evaluated})
    T.log_metrics(client, run, {f"gate.{g['name']}.{m}": v for g in evaluated  # per-set values of the ppl gate
                                for m, v in (g.get("per_set") or {}).items() if v is not None})
    T.log_metrics(client, run, {"gate.failed": sum(g["status"] == "fail" for g in result["gates"]),
                                "gate.skipped": len(result["skipped"])})
    T.set_tags(client, run, {"frugalflow.verdict": "pass" if result["passed"] else "fail",
                             "frugalflow.verdict_reasons": "; ".join(result["reasons"]) or "all gates passed",
                             "frugalflow.gates_skipped": "; ".join(result["skipped"]) or "none",
                             **{f"frugalflow.gate.{g['name']}": g["status"] + (f": {g['reason']}" if g["reason"] else "")
                                for g in result["gates"]}})
    T.log_json(client, run, result, "verdict.json")
    for g in result["gates"]:
        logger.info("gate [%s] %s", g["kind"], describe(g))
    logger.info("verdict %s; objective %s = %s, %s", "PASS" if result["passed"] else "FAIL", objective,
                result["objective_value"], "no champion yet" if champion is None else
                f"{'beats' if result['beats_champion'] else 'does not beat'} champion version {champion.get('version')}")
    return result
