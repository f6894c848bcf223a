"""Prefect task: the gate verdict for a candidate, recorded on the parent run."""
from __future__ import annotations

from prefect import get_run_logger, task

from frugalflow.gates import verdict
from tasks import registry as R
from tasks import tracking as T


@task(name="gate")
def gate(candidate: dict, baseline: dict, gates, objective: str, model_name: str, tracking: T.Tracking) -> dict:
    logger = get_run_logger()
    client = T.connect(tracking.uri)
    champion = R.champion_metrics(client, model_name)
    result = verdict(candidate, baseline, gates, champion, objective)
    run = tracking.parent_run_id
    T.log_metrics(client, run, {f"gate.{g['name']}": g["value"] for g in result["gates"]})
    T.log_metrics(client, run, {f"gate.{g['name']}.passed": int(g["passed"]) for g in result["gates"]})
    T.set_tags(client, run, {"frugalflow.verdict": "pass" if result["passed"] else "fail",
                             "frugalflow.verdict_reasons": "; ".join(result["reasons"]) or "all gates passed"})
    T.log_json(client, run, result, "verdict.json")
    for g in result["gates"]:
        logger.info("gate %-18s %10.4g %s %-8g %s", g["name"], g["value"], g["rule"], g["threshold"],
                    "PASS" if g["passed"] else "FAIL")
    return result
