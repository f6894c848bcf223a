"""The accelerator slot: heavy computation (compression stages, distillation, evaluation) runs
inside `gpu_slot(label)`, which holds one slot of a Prefect global concurrency limit.

The limit's name comes from `FRUGALFLOW_GPU_LIMIT` (default `gpu`); a team creates it once
(`prefect gcl create gpu --limit 1`, one slot per card) so that two flow runs never compute on
one card at once: the second waits. With no Prefect API configured (the embedded default runs
on Prefect's ephemeral API) or no limit of that name on the server, nothing is held and nothing
waits. Every hold is logged on the run with its wall-clock start and end (the record that shows
two runs' heavy parts did not overlap); `Hold` carries the same figures for MLflow.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

LIMIT_ENV = "FRUGALFLOW_GPU_LIMIT"
DEFAULT_LIMIT = "gpu"
LOG_FORMAT = "gpu slot %r %s: %s from %.3f to %.3f (%.2f s, waited %.2f s)"


@dataclass
class Hold:
    """One stretch of heavy work: when it asked for the slot, got it and gave it back (epoch s)."""

    name: str
    label: str
    held: bool = False  # False: no limit to hold (embedded default, or none created on the server)
    requested: float = 0.0
    start: float = 0.0
    end: float = 0.0

    @property
    def waited_s(self) -> float:
        return self.start - self.requested

    def metrics(self) -> dict:
        """For the MLflow run of the work: `gpu_slot.start` / `.end` (epoch s) and `.wait_s`."""
        return {"gpu_slot.start": self.start, "gpu_slot.end": self.end, "gpu_slot.wait_s": self.waited_s}


def limit_name() -> str:
    return os.environ.get(LIMIT_ENV) or DEFAULT_LIMIT


def api_url() -> str | None:
    """The Prefect API this process talks to, or None on the ephemeral default."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def limit_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


def _logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return logging.getLogger(__name__)


@contextlib.contextmanager
def gpu_slot(label: str, name: str | None = None, record=None):
    """Hold one slot of the global concurrency limit `name` (default: `limit_name()`) while the
    block runs; yields the `Hold`, whose `end` is set when the block finishes. `record(hold)`, if
    given, is called then (e.g. to log `hold.metrics()` on the work's MLflow run)."""
    hold = Hold(name=name or limit_name(), label=label, requested=time.time())
    logger = _logger()
    try:
        if api_url() is None or not limit_exists(hold.name):
            hold.start = time.time()
            try:
                yield hold
            finally:
                hold.end = time.time()
            return
        from prefect.concurrency.sync import concurrency

        logger.info("gpu slot %r: %s waiting for a slot", hold.name, label)
        with concurrency(hold.name, occupy=1, strict=True):
            hold.held, hold.start = True, time.time()
            try:
                yield hold
            finally:
                hold.end = time.time()
                logger.info(LOG_FORMAT, hold.name, "held", label, hold.start, hold.end, hold.end - hold.start,
                            hold.waited_s)
    finally:
        if record is not None and hold.end:
            try:
                record(hold)
            except Exception as exc:  # the timeline is a record, never a reason to fail the work
                logger.warning("gpu slot %r: could not record %s's hold: %s", hold.name, label, exc)
