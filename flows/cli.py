"""`frugalflow`: the command line.

    frugalflow validate [FILE | -p FILE] [-s K=V]   check a recipe, print a summary
    frugalflow run [-p FILE] [-s KEY=VALUE ...]      run the nightly flow once
    frugalflow sweep [-p FILE] -g KEY=V1,V2 ...      candidates over a grid; the Pareto-best passing one promoted
    frugalflow schedule [-p FILE] [--check]          serve the nightly deployment (needs PREFECT_API_URL)
    frugalflow runs [-n N]                           recent runs: recipe, verdict, ppl, size, speed
    frugalflow compare RUN RUN ...                   runs side by side (ids or their first characters)
    frugalflow promote VERSION --reason TEXT         move `champion` by hand
    frugalflow rollback --reason TEXT                move `champion` back to the previous one
    frugalflow ui [--port 5000]                      the MLflow UI on the local store
    frugalflow export DIR --format F --out PATH      a packed model as GGUF (llama.cpp) or compressed-tensors (vLLM)

Exit codes: 0 ok, 2 invalid recipe or arguments, 1 anything else.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from frugalflow.config import RecipeError
from frugalflow.recipe_io import load_recipe


def _recipe_or_exit(path: str, overrides: list[str]):
    try:
        return load_recipe(path, overrides)
    except RecipeError as exc:
        print(f"invalid recipe {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def summary(recipe) -> str:
    stages = " -> ".join(f"{s.kind}:{s.method}" for s in recipe.stages)
    gates = {k: v for k, v in recipe.gates.model_dump().items() if v is not None}
    return (f"recipe {recipe.name}: ok\n  base model: {recipe.base_model.source} -> {recipe.base_model.path}\n"
            f"  data: {recipe.data.corpus}, windows of {recipe.data.window} "
            f"(calib {recipe.data.calib_windows}, train {recipe.data.train_windows}, eval {recipe.data.eval_windows})\n"
            f"  stages: {stages}\n  gates: {gates}\n  registry: {recipe.registry.model_name} "
            f"(objective {recipe.registry.objective})\n  schedule: {recipe.schedule.cron} {recipe.schedule.timezone}\n"
            f"  tracking: {recipe.tracking.uri}")


def cmd_validate(args) -> int:
    print(summary(_recipe_or_exit(args.params or args.file, args.set)))
    return 0


def cmd_run(args) -> int:
    _recipe_or_exit(args.params, args.set)  # exit 2 before Prefect or any heavy work starts
    from flows.nightly import compression_flow

    result = compression_flow(params=args.params, overrides=args.set)
    promo = result["promotion"]
    print(f"\nrun {result['run_id']}: verdict {'PASS' if result['verdict']['passed'] else 'FAIL'}")
    for reason in result["verdict"]["reasons"]:
        print(f"  - {reason}")
    c, b = result["candidate"], result["baseline"]
    print(f"  ppl {b['ppl']:.3f} -> {c['ppl']:.3f}; size {b['size_mb']:.1f} -> {c['size_mb']:.1f} MB; "
          f"decode {b['decode_tps']:.1f} -> {c['decode_tps']:.1f} tok/s")
    if promo["registered"]:
        print(f"  registered version {promo['version']}" + (" and promoted to champion" if promo["champion"] else ""))
    return 0


def cmd_sweep(args) -> int:
    recipe = _recipe_or_exit(args.params, args.set)  # exit 2 before Prefect or any heavy work starts
    from flows.sweep import candidate_recipes, sweep_flow, sweep_runner

    try:
        candidates = candidate_recipes(args.params, args.grid, args.set)  # every grid point, before any work
    except RecipeError as exc:
        print(f"invalid sweep {exc}", file=sys.stderr)
        return 2
    print(f"sweep: {len(candidates)} candidates: {', '.join(c[0] for c in candidates)}")
    workers = args.parallel or recipe.sweep.max_parallel
    result = sweep_flow.with_options(task_runner=sweep_runner(workers))(
        params=args.params, grid=args.grid, overrides=args.set)
    print(f"\nsweep {result['run_id']}: {len(result['candidates'])} candidates, selected: {result['selected'] or 'none'}")
    for c in result["candidates"]:
        m = c["metrics"] or {}
        mark = "*" if c["selected"] else ("P" if c["pareto"] else " ")
        state = c["error"] or ("pass" if c["passed"] else "fail")
        print(f"  {mark} {c['label']:<32} ppl {m.get('ppl', float('nan')):8.3f}  {m.get('size_mb', float('nan')):7.1f} MB  "
              f"{m.get('decode_tps', float('nan')):6.1f} tok/s  {state}")
    print("  (* selected, P on the Pareto front)")
    promo = result["promotion"]
    if promo["registered"]:
        print(f"  registered version {promo['version']}" + (" and promoted to champion" if promo["champion"] else ""))
    return 0


def cmd_schedule(args) -> int:
    _recipe_or_exit(args.params, args.set)  # exit 2 before Prefect starts
    from flows.schedule import check_nightly, serve_nightly

    if args.check:
        print(check_nightly(args.params, args.set))
        return 0
    serve_nightly(args.params, args.set)
    return 0


def _client(args):
    from tasks import tracking as T

    recipe = _recipe_or_exit(args.params, [])
    uri = args.tracking_uri or T.resolve_uri(recipe.tracking.uri, Path(args.params).resolve().parent)
    return T.connect(uri), recipe, uri


def cmd_runs(args) -> int:
    from flows.run_table import recent_runs, render_table

    client, recipe, _ = _client(args)
    print(render_table(recent_runs(client, recipe.registry.model_name, args.n)))
    return 0


def cmd_compare(args) -> int:
    from flows.compare import compare_runs, render_compare

    client, recipe, _ = _client(args)
    print(render_compare(compare_runs(client, args.runs, recipe.registry.model_name)))
    return 0


def cmd_promote(args) -> int:
    from tasks.registry import promote

    client, recipe, _ = _client(args)
    entry = promote(client, recipe.registry.model_name, args.version, args.reason, by="cli")
    print(f"champion of {recipe.registry.model_name}: version {entry['previous']} -> {entry['version']} "
          f"at {entry['at']} ({entry['reason']})")
    return 0


def cmd_rollback(args) -> int:
    from tasks.registry import rollback

    client, recipe, _ = _client(args)
    entry = rollback(client, recipe.registry.model_name, args.reason)
    print(f"champion of {recipe.registry.model_name}: version {entry['previous']} -> {entry['version']} "
          f"at {entry['at']} ({entry['reason']})")
    return 0


def cmd_ui(args) -> int:
    _, _, uri = _client(args)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C to stop", flush=True)
    return subprocess.call(cmd, env=os.environ.copy())


def cmd_export(args) -> int:
    from frugalflow.export import ExportError

    try:
        if args.format == "gguf":
            from frugalflow.export.gguf import export_gguf

            summary = export_gguf(args.model_dir, args.out, float_type=args.float_type,
                                  require_exact=args.require_exact, overwrite=args.overwrite)
        else:
            from frugalflow.export.compressed_tensors import export_compressed_tensors

            summary = export_compressed_tensors(args.model_dir, args.out, require_exact=args.require_exact,
                                                overwrite=args.overwrite)
    except (ExportError, FileExistsError) as exc:
        print(f"frugalflow export: {exc}", file=sys.stderr)
        return 2
    kinds = summary.get("linears") or summary.get("formats")
    print(f"wrote {summary['path']} ({summary['format']}, {summary['bytes'] / 1e6:.1f} MB): linears {kinds}")
    if summary["format"] == "gguf":
        print(f"  file type {summary['file_type']}; other floats {summary['float_type']}; max |GGUF - ours| "
              f"{summary['max_abs_err']:.3g}; tokenizer pre {summary['tokenizer']['pre']}")
        if "warning" in summary["tokenizer"]:
            print(f"  warning: {summary['tokenizer']['warning']}")
    reasons: dict[str, int] = {}
    for why in summary["fallback"].values():
        reasons[why] = reasons.get(why, 0) + 1
    for why, n in reasons.items():
        print(f"  {n} quantized layer(s) written dense: {why}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugalflow", description="Model compression flows with tracking.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_store(p):
        p.add_argument("-p", "--params", default="params.yaml")
        p.add_argument("--tracking-uri", default=None, help="default: tracking.uri from the params")
        return p

    p = sub.add_parser("validate", help="check a recipe file")
    p.add_argument("file", nargs="?", default="params.yaml")
    p.add_argument("-p", "--params", default=None, help="the recipe file, as for run (instead of FILE)")
    p.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("run", help="run the compression flow once")
    p.add_argument("-p", "--params", default="params.yaml")
    p.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("sweep", help="run a grid of candidates; promote the Pareto-best passing one")
    p.add_argument("-p", "--params", default="params.yaml")
    p.add_argument("-g", "--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values of one recipe key (repeat for more keys; adds to sweep.grid)")
    p.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--parallel", type=int, default=None, help="candidates at once (default sweep.max_parallel)")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("schedule", help="serve the nightly deployment (cron and time zone from params)")
    p.add_argument("-p", "--params", default="params.yaml")
    p.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--check", action="store_true", help="validate the schedule, print the next runs, serve nothing")
    p.set_defaults(func=cmd_schedule)
    p = with_store(sub.add_parser("runs", help="recent runs"))
    p.add_argument("-n", type=int, default=10)
    p.set_defaults(func=cmd_runs)
    p = with_store(sub.add_parser("compare", help="runs side by side"))
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids or their first characters (frugalflow runs)")
    p.set_defaults(func=cmd_compare)
    p = with_store(sub.add_parser("promote", help="move champion to a version"))
    p.add_argument("version")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_promote)
    p = with_store(sub.add_parser("rollback", help="move champion back"))
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("export", help="write a model as GGUF or compressed-tensors for serving")
    p.add_argument("model_dir", help="a dense or packed model directory (with its tokenizer)")
    p.add_argument("--format", required=True, choices=("gguf", "compressed-tensors"))
    p.add_argument("--out", required=True, help="the .gguf file, or the compressed-tensors directory")
    p.add_argument("--float-type", default="f16", choices=("f16", "f32"),
                   help="GGUF type of embeddings and of layers without a quantized GGUF type")
    p.add_argument("--require-exact", action="store_true",
                   help="refuse instead of writing a quantized layer dequantized")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)
    p = with_store(sub.add_parser("ui", help="open the MLflow UI on the store"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConnectionError, ValueError, FileNotFoundError) as exc:
        print(f"frugalflow {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except Exception as exc:  # MLflow registry errors and the like: one line, not a traceback
        if type(exc).__name__ in ("MlflowException", "RestException"):
            print(f"frugalflow {args.command}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
