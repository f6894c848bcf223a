"""Disk and artifact-store growth over simulated nights, with and without retention (issue #40 item 2).

    python benchmarks/storage_growth.py [--nights 12] [--keep 2] [--days 2]

Two tiny projects (tests/conftest.py's tiny random Llama, tests/helpers.py's project, the real nightly flow
in this process under Prefect's test harness) get the same nights, interleaved: a new distillation setting
most nights, an unchanged night, a night whose candidate fails its gates, new data on two nights (every
stage computed anew), one smaller model (3-bit) that the objective, size_mb, promotes. One has
`retention.enabled` with keep_challengers --keep; its stage_days and run_days are --days nights, converted
to days with the mean wall time of a night so far (the clock is real: a night here lasts under a minute,
not a day). After each night: bytes of stage outputs and everything under artifacts/, of the MLflow
artifact store (mlartifacts/) and of the sqlite database, versions, stage outputs, runs holding model
files. Writes benchmarks/results/storage_growth.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import build_tiny_llama, build_tiny_tokenizer  # noqa: E402
from helpers import client_for, git, make_project, run_flow, tiny_recipe  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from tasks.retention import disk_bytes  # noqa: E402

MODEL = "tiny-growth"
DAY_S = 86400.0
LR = "stages.2.lr={:.4f}"
FAIL, SMALLER = "gates.max_ppl=0.5", "stages.1.bits=3"  # no version; a smaller model (the objective is size_mb)
# (event, overrides, eval windows after new data or None)
NIGHTS = [("first", [LR.format(1e-4)], None), ("new setting", [LR.format(2e-4)], None),
          ("unchanged", [LR.format(2e-4)], None), ("new data", [LR.format(2e-4)], 5),
          ("new setting", [LR.format(3e-4)], None), ("fails gates", [LR.format(4e-4), FAIL], None),
          ("smaller model, promoted", [LR.format(5e-4), SMALLER], None), ("new data", [LR.format(5e-4)], 4),
          ("new setting", [LR.format(6e-4)], None), ("new setting", [LR.format(7e-4)], None),
          ("new setting", [LR.format(8e-4)], None), ("new setting", [LR.format(9e-4)], None)]


def night_plan(n: int) -> list[tuple]:
    """NIGHTS, then new settings until n."""
    return [NIGHTS[k] if k < len(NIGHTS) else ("new setting", [LR.format((k + 1) * 1e-4)], None) for k in range(n)]


def measure(project: Path) -> dict:
    client = client_for(project)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=5000)
    holding = sum(1 for r in runs if "frugalflow.candidate" in r.data.tags
                  and {"model", "serving"} & {a.path for a in client.list_artifacts(r.info.run_id)})
    stages, store = project / "artifacts" / "stages", project / "mlartifacts"
    model_files = [*store.glob("*/artifacts/model"), *store.glob("*/artifacts/serving"), *store.glob("models/*/artifacts")]
    return {"stages_mb": disk_bytes(stages) / 1e6, "artifacts_mb": disk_bytes(project / "artifacts") / 1e6,
            "mlartifacts_mb": disk_bytes(store) / 1e6, "model_files_mb": sum(map(disk_bytes, model_files)) / 1e6,
            "db_mb": (project / "mlflow.db").stat().st_size / 1e6,
            "versions": len(client.search_model_versions(f"name = '{MODEL}'")),
            "stage_outputs": sum(1 for p in stages.iterdir() if p.is_dir()) if stages.is_dir() else 0,
            "runs_with_model_files": holding}


def new_data(project: Path, eval_windows: int) -> None:
    """Other prepared data: a DVC-owned key in params.yaml, committed (every stage and evaluation anew)."""
    params = project / "params.yaml"
    recipe = yaml.safe_load(params.read_text())
    recipe["data"]["eval_windows"] = eval_windows
    params.write_text(yaml.safe_dump(recipe, sort_keys=False))
    git(project, "commit", "-qam", f"eval windows {eval_windows}")


def run(nights: int, keep: int, days: float, work: Path) -> dict:
    from prefect.testing.utilities import prefect_test_harness

    model = work / "tiny-llama"
    build_tiny_llama().save_pretrained(model)
    build_tiny_tokenizer().save_pretrained(model)
    recipe = tiny_recipe(model, MODEL, evaluation={"decode_race_rounds": 0, "decode_tokens": 4},
                         registry={"model_name": MODEL, "objective": "size_mb"})
    projects = {}
    for label, enabled in (("without", False), ("with", True)):
        (work / label).mkdir()
        projects[label] = make_project(work / label, {**recipe, "retention": {"enabled": enabled,
                                                                            "keep_challengers": keep}})
    rows, seconds = [], []
    with prefect_test_harness(server_startup_timeout=180):
        for k, (event, changes, eval_windows) in enumerate(night_plan(nights), 1):
            row = {"night": k, "event": event}
            for label, project in projects.items():
                if eval_windows is not None:
                    new_data(project, eval_windows)
                horizon = days * (sum(seconds) / len(seconds) if seconds else 60.0) / DAY_S
                overrides = [*changes, f"retention.stage_days={horizon:.8f}", f"retention.run_days={horizon:.8f}"]
                started = time.monotonic()
                result = run_flow(project, overrides)
                seconds.append(time.monotonic() - started)
                row[label] = {**measure(project), "seconds": round(seconds[-1], 1),
                              "registered": result["promotion"]["version"], "champion": result["promotion"]["champion"],
                              "retention": (result.get("retention") or {}).get("summary")}
                print(f"night {k} {event} {label}: {row[label]}", flush=True)
            rows.append(row)
    return {"rows": rows, "nights": nights, "keep_challengers": keep, "days_in_nights": days,
            "mean_night_s": round(sum(seconds) / len(seconds), 1)}


def markdown(result: dict) -> str:
    rows = result["rows"]
    first, last, tail = rows[0], rows[-1], rows[-min(4, len(rows))]

    def cells(r: dict) -> str:
        return (f"{r['stages_mb']:.2f} ({r['stage_outputs']}) | {r['model_files_mb']:.2f} ({r['runs_with_model_files']}) | "
                f"{r['mlartifacts_mb'] - r['model_files_mb']:.2f} | {r['db_mb']:.2f} | {r['versions']}")

    def per_night(key: str, label: str, since: dict | None = None) -> float:
        since = since or tail
        return (last[label][key] - since[label][key]) / max(1, last["night"] - since["night"])

    def kept(label: str, since: dict | None = None) -> float:
        return per_night("stages_mb", label, since) + per_night("model_files_mb", label, since)

    lines = [
        "# Storage growth over simulated nights, with and without retention",
        "",
        f"{result['date']}, {result['machine']}. `python benchmarks/storage_growth.py --nights {result['nights']} "
        f"--keep {result['keep_challengers']} --days {result['days_in_nights']:g}`: the real nightly flow on the "
        "tiny random Llama (2 layers, hidden 64; tests/conftest.py) in two projects, the same nights interleaved "
        "(objective size_mb). With retention: keep_challengers "
        f"{result['keep_challengers']}, stage_days and run_days {result['days_in_nights']:g} nights (a night here "
        f"lasted {result['mean_night_s']} s on average, so the horizon is that many seconds times the nights). "
        "Columns per project: stage outputs under artifacts/stages/ MB (how many); runs' model files in the MLflow "
        "artifact store (model/, serving/, logged pyfunc models) MB (runs holding them); the rest of the artifact "
        "store (reports, plots, recipes, stats) MB; the sqlite database MB; registered versions.",
        "",
        "| night | event | without: stages | model files | other artifacts | sqlite | versions "
        "| with: stages | model files | other artifacts | sqlite | versions | retention at the night's end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['night']} | {r['event']} | {cells(r['without'])} | {cells(r['with'])} | "
                     f"{r['with']['retention'] or '-'} |")
    span = f"nights {tail['night']}-{last['night']}"
    lines += [
        "",
        f"After {last['night']} nights, stage outputs + model files: "
        f"{last['without']['stages_mb'] + last['without']['model_files_mb']:.2f} MB without retention, "
        f"{last['with']['stages_mb'] + last['with']['model_files_mb']:.2f} MB with it: {kept('without', first):.3f} "
        f"against {kept('with', first):.3f} MB a night from night {first['night']}. Growth a night over {span}: "
        f"stage outputs {per_night('stages_mb', 'without'):.3f} MB without, {per_night('stages_mb', 'with'):.3f} "
        f"with; model files {per_night('model_files_mb', 'without'):.3f} MB without, "
        f"{per_night('model_files_mb', 'with'):.3f} with; the rest of the artifact store "
        f"{per_night('mlartifacts_mb', 'without') - per_night('model_files_mb', 'without'):.3f} MB and "
        f"{per_night('mlartifacts_mb', 'with') - per_night('model_files_mb', 'with'):.3f} MB (kept: every run's "
        "record stays); sqlite "
        f"{per_night('db_mb', 'without'):.3f} and {per_night('db_mb', 'with'):.3f} MB (it does not shrink when rows go; "
        "`VACUUM` returns the pages).",
        "On the tiny model about half of a run's model files is the code the logged pyfunc bundles (the "
        "`frugalflow` package, about 0.5 MB of source); on SmolLM2 each stage output and each copy of the model "
        "in a run's files holds the model itself (106 MB for the default champion), so the columns retention "
        "bounds are the ones that grow there.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=12)
    parser.add_argument("--keep", type=int, default=2, help="retention.keep_challengers")
    parser.add_argument("--days", type=float, default=2.0, help="stage_days and run_days, in nights")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="frugalflow-growth-") as tmp:
        result = run(args.nights, args.keep, args.days, Path(tmp))
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": describe(), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storage_growth.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "storage_growth.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
