"""Kills at random instants across registration, publication and promotion (tasks/promote.py
`register_and_promote`, the real task, with an S3 models bucket and the serving files): every write
the phase makes (each MLflow write call, each S3 upload) is a step; a child process doing the phase
is SIGKILLed at a random instant inside a step not hit yet, until every step has been hit (the step
running or last finished when the signal came). After each kill the rerun of the same candidate
(what the next night does: close the orphans, register and promote again) must leave exactly one
version per candidate, a champion whose recorded history ends at the alias, published and serving
files complete on it, and no RUNNING run.

The children are forked from a forkserver with MLflow and the task preloaded, so a kill costs a
fraction of a second, not an interpreter start."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from helpers import free_port

MODEL, EXPERIMENT = "tiny-random-kills", "random-kills"
WRITES = ("set_", "create_", "delete_", "log_", "update_", "rename_")
BUCKET = "models"


def _traced(trace: Path, starts=None):
    """Wrap MlflowClient's write methods and S3 uploads so that each call appends `<n> start <name> <t>`
    before and `<n> done <name> <t>` after it to `trace` (t: monotonic seconds), and sends n to the
    pipe `starts` as it starts (the killer waits on it)."""
    from mlflow import MlflowClient

    from tasks import storage

    count = [0]

    def wrap(name, fn):
        def call(*args, **kwargs):
            count[0] += 1
            n = count[0]
            with trace.open("a") as fh:
                fh.write(f"{n} start {name} {time.monotonic()}\n")
            if starts is not None:
                starts.send(n)
            result = fn(*args, **kwargs)
            with trace.open("a") as fh:
                fh.write(f"{n} done {name} {time.monotonic()}\n")
            return result
        return call

    for name in dir(MlflowClient):
        if name.startswith(WRITES):
            setattr(MlflowClient, name, wrap(name, getattr(MlflowClient, name)))
    make_client = storage.s3_client

    def s3_client(*args, **kwargs):
        client = make_client(*args, **kwargs)
        client.upload_file = wrap("s3.upload_file", client.upload_file)
        return client

    storage.s3_client = s3_client


def candidate_run(client, experiment_id: str, k: int) -> str:
    """A night's parent run for candidate k, as the flow leaves it before registration: open, owned
    by this process (heartbeat), with its candidate metrics (each candidate better than the last)."""
    from tasks import runstate
    from tasks import tracking as T

    run_id = T.start_run(client, experiment_id, f"night-{k}", tags=runstate.process_tags())
    T.log_metrics(client, run_id, {"candidate.ppl": 20.0 - k, "candidate.size_mb": 1.0})
    return run_id


def night(uri: str, model_dir: str, k: int, trace: str | None = None, starts=None) -> dict:
    """Registration, publication and promotion of candidate k in a run of its own, then the run closed;
    with `trace`, every write is recorded (the forked child)."""
    from tasks import tracking as T
    from tasks.promote import register_and_promote

    if trace:
        _traced(Path(trace), starts)
    client = T.connect(uri)
    run_id = candidate_run(client, client.get_experiment_by_name(EXPERIMENT).experiment_id, k)
    if trace:
        with open(trace, "a") as fh:
            fh.write(f"0 phase - {time.monotonic()}\n")
    verdict = {"passed": True, "objective": "ppl", "reasons": []}
    tracking = T.Tracking(uri=uri, experiment_id=client.get_run(run_id).info.experiment_id, parent_run_id=run_id)
    result = register_and_promote.fn(verdict, MODEL, {"frugalflow.candidate": str(k)}, tracking, model_dir=model_dir)
    T.end_run(client, run_id)
    return result


def steps(trace: Path) -> list[tuple[int, str, str, float]]:
    """(n, start|done|phase, name, monotonic time) of every traced line; a line being written is skipped."""
    rows = [line.split() for line in trace.read_text().splitlines()] if trace.exists() else []
    return [(int(row[0]), row[1], row[2], float(row[3])) for row in rows if len(row) == 4]


def step_windows(trace: Path) -> dict[int, float]:
    """Seconds from each write's start to the next write's start (the last: to its end), in an
    uninterrupted night."""
    rows = steps(trace)
    starts = sorted((n, t) for n, what, _, t in rows if what == "start")
    end = max(t for *_, t in rows)
    return {n: (starts[i + 1][1] if i + 1 < len(starts) else end) - t for i, (n, t) in enumerate(starts)}


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_random_kills_across_registration_publication_and_promotion(tmp_path, tiny_model_dir, s3_endpoint,
                                                                     monkeypatch):
    import boto3
    from mlflow import MlflowClient

    from tasks.runstate import close_orphans

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ENDPOINT_URL": s3_endpoint, "FRUGALFLOW_MODELS_URI": f"s3://{BUCKET}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "mlruns").as_uri())

    def model_dir(k: int) -> str:  # the final stage output of candidate k: its folder name is its content key
        path = tmp_path / "stages" / f"candidate-{k:03d}"
        if not path.exists():
            shutil.copytree(tiny_model_dir, path)
        return str(path)

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "mlflow", "boto3", "tasks.promote", "tasks.serving", "tasks.storage",
                                "tasks.tracking", "frugalflow.export.gguf", "frugalflow.export.compressed_tensors"])

    # two uninterrupted nights, traced: the first creates the registered model, the second is every
    # later night's sequence of writes, and how long each takes
    for k in (0, 1):
        reference = tmp_path / f"trace-reference-{k}"
        child = ctx.Process(target=night, args=(uri, model_dir(k), k, str(reference)))
        child.start()
        child.join(300)
        assert child.exitcode == 0
    names = {n: name for n, what, name, _ in steps(reference) if what == "start"}
    windows = step_windows(reference)
    assert {"create_model_version", "set_registered_model_alias", "s3.upload_file", "log_artifact",
            "set_model_version_tag", "set_registered_model_tag", "set_terminated"} <= set(names.values())

    hit: dict[int, str] = {}
    seed = int(os.environ.get("FRUGALFLOW_TEST_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    for k in range(2, 3 * len(names) + 2):
        missing = [n for n in sorted(names) if n not in hit]
        if not missing:
            break
        target = rng.choice(missing)
        trace, t0 = tmp_path / f"trace-{k}", time.monotonic()
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=night, args=(uri, model_dir(k), k, str(trace), sender))
        child.start()
        sender.close()
        # when the target write starts, a random instant before the next one starts
        started = 0
        with contextlib.suppress(EOFError):  # the child ended
            while started < target and receiver.poll(120):
                started = receiver.recv()
        assert started >= target, f"night {k} (seed {seed}) ended before write {target}: exit {child.exitcode}"
        time.sleep(rng.uniform(0, windows[target]))
        child.kill()
        child.join(30)
        if child.exitcode == 0:  # the instant fell after the night's end: nothing to recover
            champion = client.get_model_version_by_alias(MODEL, "champion")
            check_registry(client, s3, k, {"registered": True, "champion": True, "version": str(champion.version)},
                           "after its end", f"seed {seed}", model_dir(k))
            continue
        assert child.exitcode == -9, f"night {k} (seed {seed}): exit {child.exitcode}"
        last = next((row for row in reversed(steps(trace)) if row[1] != "phase"), None)
        if last is not None:
            hit.setdefault(last[0], f"{last[1]} {last[2]}")
        # the next night of the same candidate, as the flow runs it: close the orphans, then the phase again
        close_orphans(client, [experiment_id])
        result = night(uri, model_dir(k), k)
        killed_at = f"{last[1]} of write {last[0]} ({last[2]})" if last else "before the first write"
        check_registry(client, s3, k, result, killed_at, f"seed {seed}", model_dir(k))
        print(f"night {k}: target {target}, killed {killed_at}, {time.monotonic() - t0:.1f} s", flush=True)
    print(f"{k} nights, {len(hit)} of {len(names)} writes hit (seed {seed}); reference night "
          f"{sum(windows.values()):.1f} s: {', '.join(f'{n}:{names[n]}' for n in sorted(names))}")
    missing = [(n, names[n]) for n in sorted(names) if n not in hit]
    assert not missing, f"writes never hit by a random kill (seed {seed}): {missing}"


def check_registry(client, s3, k: int, result: dict, killed_at: str, seed: str, model_dir: str) -> None:
    """After the kill and the rerun of candidate k: one version per candidate, candidate k's version
    champion with a history that ends at it, its model published whole and its serving files attached,
    nothing RUNNING."""
    from tasks import registry as R

    context = f"night {k} killed {killed_at} ({seed})"
    version = result["version"]
    assert result["registered"] and result["champion"], f"{context}: {result}"
    keys = [v.tags.get(R.MODEL_KEY) for v in client.search_model_versions(f"name = '{MODEL}'")]
    assert len(keys) == len(set(keys)) == k + 1, f"{context}: versions' candidates {sorted(keys)}"
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == version and champion.tags[R.MODEL_KEY] == Path(model_dir).name, context
    assert R.RUN_FAILED not in champion.tags, context
    moves = R.history(client, MODEL)
    assert moves[-1]["version"] == version, f"{context}: history {moves}"
    assert all(m["previous"] != m["version"] for m in moves), f"{context}: a self-move in {moves}"
    assert all(b["previous"] == a["version"] for a, b in zip(moves, moves[1:])), f"{context}: history {moves}"
    prefix = f"{MODEL}/v{version}/"
    published = sorted(o["Key"][len(prefix):] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"])
    files = sorted(p.relative_to(model_dir).as_posix() for p in Path(model_dir).rglob("*") if p.is_file())
    assert published == files and champion.tags.get("s3_uri") == f"s3://{BUCKET}/{MODEL}/v{version}", context
    # the model is dense: a GGUF file, no compressed-tensors one
    assert champion.tags.get("serving.gguf") == "serving/model.gguf", f"{context}: {champion.tags}"
    running = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                 "attributes.status = 'RUNNING'")
    assert not running, f"{context}: RUNNING runs {[r.info.run_id for r in running]}"
