"""Prefect task: register a passing candidate as `challenger`, promote it to `champion`
when there is none or it beats the current one on the recipe's objective."""
from __future__ import annotations

from prefect import get_run_logger, task

from tasks import registry as R
from tasks import tracking as T


@task(name="register-and-promote")
def register_and_promote(verdict: dict, model_name: str, lineage_tags: dict, tracking: T.Tracking,
                         model_uri: str | None = None) -> dict:
    logger = get_run_logger()
    client = T.connect(tracking.uri)
    run_id = tracking.parent_run_id
    if not verdict["passed"]:
        logger.warning("candidate failed its gates, not registered: %s", "; ".join(verdict["reasons"]))
        return {"registered": False, "version": None, "champion": False}
    source = model_uri or f"{client.get_run(run_id).info.artifact_uri}/model"  # models:/<model_id>: the pyfunc
    tags = {"verdict": "pass", "objective": verdict["objective"], **lineage_tags}
    version = R.register_candidate(client, model_name, run_id, source, tags)
    logger.info("registered %s version %s as challenger", model_name, version)
    T.set_tags(client, run_id, {"frugalflow.registered_version": version})
    promoted = False
    if verdict["beats_champion"]:
        champ = verdict.get("champion")
        reason = ("first passing candidate" if not champ else
                  f"{verdict['objective']} better than champion version {champ.get('version')}")
        R.promote(client, model_name, version, reason)
        promoted = True
        logger.info("promoted %s version %s to champion (%s)", model_name, version, reason)
    else:
        logger.info("version %s does not beat the champion on %s; champion unchanged", version,
                    verdict["objective"])
    T.set_tags(client, run_id, {"frugalflow.champion": promoted})
    return {"registered": True, "version": version, "champion": promoted}
