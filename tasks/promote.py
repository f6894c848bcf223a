"""Prefect task: register a passing candidate as `challenger` (and, when a models bucket is
configured, publish its directory there), attach its GGUF and compressed-tensors files
(tasks/serving.py), then promote it to `champion` when there is none or it beats the current one
on the recipe's objective, decided at promotion time under the model's promotion lock
(tasks/registry.py `promote_if_better`), not from the gate's earlier look."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from prefect import task

from tasks import registry as R
from tasks import tracking as T
from tasks.serving import attach as attach_serving_files

MODELS_URI_ENV = "FRUGALFLOW_MODELS_URI"  # e.g. s3://frugalflow-models: versions go to <uri>/<model>/v<N>


def publish_version(client, model_name: str, version: str, model_dir: str | None, logger) -> str | None:
    """Upload the version's model directory to the models bucket when FRUGALFLOW_MODELS_URI is set;
    the S3 URI (also the version's tag `s3_uri`), or None when no bucket is configured."""
    base = os.environ.get(MODELS_URI_ENV, "").rstrip("/")
    if not base or not model_dir:
        return None
    from tasks.storage import publish_model

    uri = publish_model.fn(model_dir, f"{base}/{model_name}/v{version}")
    client.set_model_version_tag(model_name, version, "s3_uri", uri)
    logger.info("published %s version %s to %s", model_name, version, uri)
    return uri


def _logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # called outside a flow or task run (`register_and_promote.fn`)
        return logging.getLogger(__name__)


@task(name="register-and-promote")
def register_and_promote(verdict: dict, model_name: str, lineage_tags: dict, tracking: T.Tracking,
                         model_uri: str | None = None, model_dir: str | None = None,
                         inputs_key: str | None = None) -> dict:
    logger = _logger()
    client = T.connect(tracking.uri)
    run_id = tracking.parent_run_id
    if not verdict["passed"]:
        logger.warning("candidate failed its gates, not registered: %s", "; ".join(verdict["reasons"]))
        return {"registered": False, "version": None, "champion": False}
    source = model_uri or f"{client.get_run(run_id).info.artifact_uri}/model"  # models:/<model_id>: the pyfunc
    tags = {"verdict": "pass", "objective": verdict["objective"], **lineage_tags}
    if model_dir:  # the final stage output's content key: a killed run's version of it is adopted
        tags[R.MODEL_KEY] = Path(model_dir).name
    if inputs_key:  # model key + evaluation inputs + gates: a later night with the same key registers nothing
        tags[R.INPUTS_KEY] = inputs_key
    version = R.register_candidate(client, model_name, run_id, source, tags)
    logger.info("registered %s version %s as challenger", model_name, version)
    T.set_tags(client, run_id, {"frugalflow.registered_version": version})
    publish_version(client, model_name, version, model_dir, logger)  # its URI: the version's tag `s3_uri`
    if model_dir:  # a deploy step gets llama.cpp's and vLLM's files from the alias alone
        attach_serving_files(client, model_name, version, run_id, model_dir, logger)
    decision = R.promote_if_better(client, model_name, version, verdict["objective"])
    if decision["promoted"]:
        logger.info("promoted %s version %s to champion (%s)", model_name, version, decision["reason"])
    else:
        logger.info("version %s not promoted: %s; champion unchanged", version, decision["reason"])
    champion = decision["champion"] == version  # also when a killed run of this candidate had promoted it
    T.set_tags(client, run_id, {"frugalflow.champion": champion})
    return {"registered": True, "version": version, "champion": champion}
