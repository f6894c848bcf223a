"""The nightly flow's state hooks that send messages (tasks/notify.py) when a night needs a look.

    @flow(on_failure=[night_failed], on_completion=[night_completed])

- `night_failed`: the flow run failed (any exception): the MLflow run (found by its tag
  `prefect.flow_run_id`; none when the night failed before starting it) and the error's first line.
- `night_completed`: the candidate failed its gates: the verdict's reasons; or it became champion and
  is worse than the champion it replaced on a metric beyond `notify.regression_pct`
  (tasks/champion_check.py): `champion_regressed`, naming each metric, both values and both versions.
  Any other passing night, and an unchanged one, sends nothing.
- `nights_crashed` (not a hook: called by flows/project.py when a night closes the runs of killed
  ones): `crashed`, one message per killed night's run, with the reason it was closed. A killed
  process runs no hook, so the next night is the first to know.

Prefect runs the hooks after the flow run's final state is set and logs, never raises, what they
raise; they re-read the recipe from the flow run's parameters. A night that failed because its recipe
does not load still notifies when the recipe's `notify` section (with `notify.*` overrides) is valid.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger

from flows.secret_overrides import restore as restore_secrets
from frugalflow.config import NotifyConfig
from frugalflow.recipe_io import RecipeSource, apply_override, find_project_root, load_recipe, parse_override, read_yaml
from frugalflow.redact import redact
from tasks import notify as N
from tasks import tracking as T


def _logger():
    """The flow run's logger (the hooks run in its context: their lines are in the run's log), else ours."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("frugalflow.notify")


@dataclass(frozen=True)
class Night:
    config: NotifyConfig
    root: Path
    model: str
    recipe: str
    uri: str | None
    experiment: str | None


def _night(flow_run) -> Night | None:
    """What a hook needs from the flow run's recipe; None (with a warning) when not even its `notify`
    section can be read."""
    params = Path(flow_run.parameters.get("params") or "params.yaml").resolve()
    overrides = restore_secrets(flow_run.parameters.get("overrides"))
    try:
        source = RecipeSource.read(params)
        recipe, root = load_recipe(source, overrides, checks="run"), source.root
        return Night(recipe.notify, root, recipe.registry.model_name, recipe.name,
                     T.resolve_uri(recipe.tracking.uri, root), recipe.experiment_name)
    except Exception:  # noqa: BLE001 - the night may have failed on this very recipe: its notify section alone
        pass
    try:
        data = read_yaml(params)
        section = {"notify": data.get("notify") or {}}
        for text in overrides:
            if text.split("=", 1)[0].strip().startswith("notify."):
                apply_override(section, *parse_override(text))
        config = NotifyConfig.model_validate(section["notify"])
        registry = data.get("registry") if isinstance(data.get("registry"), dict) else {}
        return Night(config, find_project_root(params) or params.parent, str(registry.get("model_name", "?")),
                     str(data.get("name", "?")), None, None)
    except Exception as exc:  # noqa: BLE001
        _logger().warning("no notification sent: the notify section of %s cannot be read: %s", params,
                       redact(str(exc)).splitlines()[0][:300])
        return None


def _mlflow_run(night: Night, flow_run) -> tuple[str | None, str | None]:
    """(run id, experiment id) of the MLflow run this flow run started, or Nones."""
    if night.uri is None or night.experiment is None:
        return None, None
    try:
        client = T.connect(night.uri)
        experiment = client.get_experiment_by_name(night.experiment)
        if experiment is None:
            return None, None
        runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run.id}'",
                                  max_results=1)
        return (runs[0].info.run_id if runs else None), experiment.experiment_id
    except Exception as exc:  # noqa: BLE001 - the store may be what failed the night
        _logger().warning("notification without the MLflow run: %s", redact(str(exc)).splitlines()[0][:300])
        return None, None


def _send(night: Night, event: str, flow_run, run_id: str | None, experiment: str | None, lines: list[str]):
    return _deliver(night, event, f"{flow_run.name} ({flow_run.id})", run_id, experiment, lines)


def _deliver(night: Night, event: str, flow_run: str, run_id: str | None, experiment: str | None, lines: list[str]):
    link = N.run_link(night.uri or "", experiment, run_id)
    subject, body = N.message(event, night.model, night.recipe, run_id, link, flow_run, lines)
    return N.send(night.config, night.root, event, subject, body, _logger())


def _exception(state) -> BaseException | None:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the result may not be retrievable; the state's message says it too
        return None
    return exc if isinstance(exc, BaseException) else None


def _error_line(state, exc: BaseException | None) -> str:
    if isinstance(exc, BaseException) and getattr(exc, "problems", None):  # RecipeError: its problems, not the count
        text = f"{type(exc).__name__}: {getattr(exc, 'source', '')}: {'; '.join(exc.problems)}"
    elif isinstance(exc, BaseException):
        text = f"{type(exc).__name__}: {exc}"
    else:
        text = (state.message or "unknown error").removeprefix("Flow run encountered an exception: ")
    return text.strip().splitlines()[0][:500] if text.strip() else "unknown error"


def night_failed(flow, flow_run, state) -> None:
    night = _night(flow_run)
    if night is None or "failed" not in night.config.events:
        return
    exc = _exception(state)
    # a service that did not answer (MLflow among them) is not asked again for the run: no second wait
    run_id, experiment = (None, None) if isinstance(exc, ConnectionError) else _mlflow_run(night, flow_run)
    _send(night, "failed", flow_run, run_id, experiment, [f"error: {_error_line(state, exc)}"])


def night_completed(flow, flow_run, state) -> None:
    try:
        result = state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001
        _logger().warning("no notification: the flow run's result cannot be read: %s", exc)
        return
    verdict = result.get("verdict") if isinstance(result, dict) else None
    replaced = ((result.get("promotion") or {}).get("replaced") or {}) if verdict else {}
    if not verdict or result.get("unchanged") or (verdict.get("passed") and not replaced.get("regressions")):
        return  # passed without a regression, or unchanged (no verdict): nothing to say
    event = "champion_regressed" if verdict.get("passed") else "gates_failed"
    night = _night(flow_run)
    if night is None or event not in night.config.events:
        return
    _, experiment = _mlflow_run(night, flow_run)
    lines = N.regression_lines(replaced) if event == "champion_regressed" else verdict.get("reasons") or []
    _send(night, event, flow_run, result.get("run_id"), experiment, lines)


def nights_crashed(recipe, root: Path, uri: str, client, closed: list[str]) -> int:
    """A `crashed` message for each top-level run among `closed` (the runs `close_orphans` just closed:
    their process was killed, or their host stopped beating); how many were sent. Never raises."""
    if "crashed" not in recipe.notify.events:
        return 0
    night = Night(recipe.notify, root, recipe.registry.model_name, recipe.name, uri, recipe.experiment_name)
    sent = 0
    for run_id in closed:
        try:
            run = client.get_run(run_id)
            if "mlflow.parentRunId" in run.data.tags:
                continue  # a stage's run: its night's run says it
            _deliver(night, "crashed", run.data.tags.get("prefect.flow_run_id") or "unknown", run_id,
                     run.info.experiment_id, N.crash_lines(run))
            sent += 1
        except Exception as exc:  # noqa: BLE001 - a message is never worth failing the night that found the crash
            _logger().warning("no crash notification for run %s: %s: %s", run_id, type(exc).__name__,
                              redact(str(exc)).splitlines()[0][:300] if str(exc) else "")
    return sent
