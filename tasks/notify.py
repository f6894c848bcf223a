"""Messages about a night that needs a look, delivered through Prefect notification blocks.

The recipe's `notify` section (frugalflow/config.py `NotifyConfig`) names the destinations: a
`CustomWebhookNotificationBlock` (Prefect's own) POSTs JSON `{text, subject, body, event}` to
`webhook_url` (`text` is what Slack and Mattermost incoming webhooks show); `LocalFileNotification`,
a NotificationBlock of ours, appends one JSON line `{at, event, subject, body}` to `file` (the default,
`artifacts/notifications.jsonl`: no server, works offline). The blocks are built from the recipe on
each send and never saved to a Prefect server.

A message that cannot be delivered is a warning naming the destination, never an error: a webhook
that is down must not fail the night. The webhook's URL is a secret in the recipe (its path may be
the token: MLflow params and recipe.yaml record `**********`); messages and warnings name only its
scheme, host and port.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from pydantic import Field

from frugalflow.config import NotifyConfig
from frugalflow.redact import redact
from frugalflow.regression import describe

log = logging.getLogger(__name__)


class LocalFileNotification(NotificationBlock):
    """Appends each message to a local file as one JSON line: {at, event, subject, body}."""

    _block_type_name = "frugalflow local file"
    path: str = Field(description="the file; its folder is created")
    event: str = Field("", description="written with each message")

    def notify(self, body: str, subject: str | None = None) -> None:  # type: ignore[override]
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "event": self.event,
                           "subject": subject, "body": body})
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def webhook_block(url: str, event: str) -> CustomWebhookNotificationBlock:
    return CustomWebhookNotificationBlock(
        name="frugalflow", url=url, timeout=10,
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}", "event": event})


def where(url: str) -> str:
    """A webhook URL as it may be shown: scheme, host and port, no user-info, path or query."""
    parts = urlsplit(url)
    return f"webhook {parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


def destinations(config: NotifyConfig, root: Path, event: str) -> list[tuple[str, NotificationBlock]]:
    """(description, block) for every destination the recipe sets."""
    found: list[tuple[str, NotificationBlock]] = []
    if config.file:
        path = Path(config.file) if Path(config.file).is_absolute() else root / config.file
        found.append((f"file {path}", LocalFileNotification(path=str(path), event=event)))
    if config.webhook_url:
        url = config.webhook_url.get_secret_value()
        found.append((where(url), webhook_block(url, event)))
    return found


def send(config: NotifyConfig, root: Path, event: str, subject: str, body: str, logger=None) -> list[str]:
    """Send one message to every destination when `event` is one the recipe asks for; the
    destinations that took it. A destination that fails is a warning naming it."""
    logger = logger or log
    if event not in config.events:
        return []
    subject, body = redact(subject), redact(body)
    delivered = []
    for what, block in destinations(config, root, event):
        try:
            block.notify(body, subject)
        except Exception as exc:  # noqa: BLE001 - any failure to deliver is a warning, never the night's failure
            logger.warning("notification %r not delivered to %s: %s: %s", subject, what, type(exc).__name__,
                           redact(str(exc)).splitlines()[0][:300] if str(exc) else "")
        else:
            delivered.append(what)
            logger.info("notification %r sent to %s", subject, what)
    return delivered


def run_link(uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """The MLflow UI's page of the run when the tracking store is a server (http/https), else None."""
    if not run_id or not experiment_id or not uri.startswith(("http://", "https://")):
        return None
    return redact(f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")


def message(event: str, model: str, recipe: str, run_id: str | None, link: str | None, flow_run: str,
            lines: list[str]) -> tuple[str, str]:
    """(subject, body) of a message: one line of subject; model, recipe, runs, then the reason's lines."""
    what = {"failed": "night failed", "gates_failed": "candidate failed its gates",
            "champion_regressed": "new champion regressed", "crashed": "a night was killed"}[event]
    subject = f"frugalflow {model}: {what}" + (f": {lines[0]}" if lines else "")
    run = run_id or "none (the night failed before starting one, or the store did not answer)"
    body = [f"model: {model} (recipe {recipe})", f"MLflow run: {run}",
            *([f"link: {link}"] if link else []), f"Prefect flow run: {flow_run}", *lines]
    return subject[:300], "\n".join(body)


def regression_lines(replaced: dict) -> list[str]:
    """The lines of a `champion_regressed` message (tasks/champion_check.py's record): the first names the
    versions and the worst metric (it goes into the subject), then every metric, both runs, the reason for
    the move and, when the two were measured on different data, both data versions."""
    found = replaced["regressions"]
    lines = [f"version {replaced['version']} replaced version {replaced['previous']}: {describe(found[0])}",
             *(describe(r) for r in found[1:]),
             f"new champion: version {replaced['version']} (run {replaced['run_id']})",
             f"previous champion: version {replaced['previous']} (run {replaced.get('previous_run_id') or '-'})",
             f"promoted for: {replaced.get('reason') or '-'}"]
    data = replaced.get("data") or {}
    if data.get("previous") != data.get("new"):
        lines.append(f"measured on different data: {data.get('previous') or '-'} then {data.get('new') or '-'}")
    return lines


def crash_lines(run) -> list[str]:
    """The lines of a `crashed` message for an MLflow run that `close_orphans` closed."""
    tags = run.data.tags
    started = datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).isoformat(timespec="seconds")
    return [f"killed night: {run.info.run_name}, started {started} by {tags.get('frugalflow.owner', '?')}",
            f"closed: {tags.get('frugalflow.failure', '?')}".splitlines()[0][:500]]
