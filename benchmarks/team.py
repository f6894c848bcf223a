"""Team mode's cost: `frugalflow team up` from nothing, and the tiny-model nightly flow in team mode
against the embedded default, interleaved in one run (medians).

    python benchmarks/team.py [--rounds 3]

Builds the test suite's tiny random Llama (tests/conftest.py) and one fresh tiny project per flow
run (tests/helpers.py; fresh, so no stage or evaluation cache is reused). Embedded: `frugalflow run`
in a subprocess (Prefect's ephemeral API, a sqlite MLflow store). Team: a deployment run of
`frugalflow-nightly/nightly` triggered through the Prefect API and executed by the team's worker,
timed from the request to COMPLETED. Then `team down` and `team up` again (warm: cluster and
deployment exist). Writes benchmarks/results/team.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import build_tiny_llama, build_tiny_tokenizer  # noqa: E402
from helpers import make_project, tiny_recipe  # noqa: E402
from team_stack import start_team  # noqa: E402

RECIPE = dict(data={"calib_windows": 4, "train_windows": 8, "eval_windows": 4}, evaluation={"decode_tokens": 4},
              gates={"min_size_reduction": 1.0})


def project(scratch: Path, model: Path, name: str) -> Path:
    folder = scratch / name
    folder.mkdir()
    return make_project(folder, tiny_recipe(model, "tiny-bench", **RECIPE))


def embedded(proj: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_", "AWS_"))}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "-p", str(proj / "params.yaml")], cwd=proj,
                          env={**env, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"},
                          capture_output=True, text=True)
    took = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"embedded run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return took


def team_run(stack, proj: Path) -> float:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(stack.prefect_api) as client:
        deployment = client.read_deployment_by_name("frugalflow-nightly/nightly")
        started = time.monotonic()
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"params": str(proj / "params.yaml")})
        while not (run.state and run.state.is_final()):
            time.sleep(1)
            run = client.read_flow_run(run.id)
        took = time.monotonic() - started
    if not run.state.is_completed():
        raise SystemExit(f"team run {run.id} ended {run.state.type}; see {stack.logs / 'worker.log'}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="frugalflow-team-bench-"))
    model = scratch / "tiny-llama"
    build_tiny_llama().save_pretrained(model)
    build_tiny_tokenizer().save_pretrained(model)
    load = os.getloadavg()[0]
    stack = start_team(scratch / "team")
    cold_up = stack.up_seconds
    times = {"embedded": [], "team": []}
    try:
        for i in range(args.rounds):
            times["embedded"].append(embedded(project(scratch, model, f"embedded-{i}")))
            times["team"].append(team_run(stack, project(scratch, model, f"team-{i}")))
            print(f"round {i + 1}: embedded {times['embedded'][-1]:.1f} s, team {times['team'][-1]:.1f} s", flush=True)
        started = time.monotonic()
        stack.stop()
        down_s = time.monotonic() - started
        warm_up = stack.start().up_seconds
    finally:
        stack.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()}, {os.cpu_count()} cores",
              "load_1min_at_start": round(load, 2), "load_1min_at_end": round(os.getloadavg()[0], 2),
              "team_up_cold_s": round(cold_up, 1), "team_down_s": round(down_s, 1), "team_up_warm_s": round(warm_up, 1),
              "flow_s": {k: [round(x, 1) for x in v] for k, v in times.items()},
              "median_s": {k: round(v, 1) for k, v in med.items()}, "team_over_embedded": round(med["team"] / med["embedded"], 2)}
    out = ROOT / "benchmarks" / "results"
    (out / "team.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "team.md").write_text(
        f"# Team mode vs embedded ({result['date']}, {result['machine']}, 1-min load {result['load_1min_at_start']} "
        f"at start, {result['load_1min_at_end']} at end)\n\n"
        f"- `team up` from nothing: {cold_up:.1f} s; `team down`: {down_s:.1f} s; `team up` again: {warm_up:.1f} s\n"
        f"- tiny-model nightly flow, {args.rounds} rounds interleaved, fresh project each: embedded "
        f"(`frugalflow run`) median {med['embedded']:.1f} s {result['flow_s']['embedded']}, team (deployment run by the worker, "
        f"request to COMPLETED) median {med['team']:.1f} s {result['flow_s']['team']}: "
        f"team/embedded {result['team_over_embedded']}x\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
