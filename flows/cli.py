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
    frugalflow team up|status|down [--home DIR]      team mode on this machine: PostgreSQL, S3, MLflow, Prefect, worker

Exit codes:
    0  done
    2  bad input: the recipe, an argument or a file named (missing, unreadable, invalid); nothing started
    3  corrupt or inconsistent data: model weights, a cache entry, a checkpoint, a DVC output
    4  a service that cannot be reached or refuses: MLflow store or server, S3, Prefect API, a full disk
    1  anything else: a bug, printed with its traceback
Every message names the key, file or service, the value found and what is allowed or what to do.
SIGTERM stops a command as Ctrl-C does: runs are closed FAILED, servers it started are stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

from frugalflow.config import RecipeError
from frugalflow.preflight import load_run_recipe
from frugalflow.recipe_io import load_recipe


def _recipe_or_exit(path: str, overrides: list[str], *, checks: str = "run"):
    """The recipe or exit 2. checks: "run" (everything a run refuses before heavy work: the project,
    DVC-owned sections, chaining, local inputs; frugalflow/preflight.py), "file" (the same where the
    file has no project around it: `validate`), "store" (the file alone: commands that only read
    the tracking store)."""
    try:
        if checks == "store":
            return load_recipe(path, overrides)
        return load_run_recipe(path, overrides, require_project=checks == "run")[0]
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
    print(summary(_recipe_or_exit(args.params or args.file, args.set, checks="file")))
    return 0


def _services_or_exit(params: str, overrides: list[str]) -> None:
    """MLflow, the S3 buckets and the Prefect API the run will use answer; else ServiceDown (exit 4)."""
    from tasks.preflight import preflight_recipe

    preflight_recipe(params, overrides)


def cmd_run(args) -> int:
    _recipe_or_exit(args.params, args.set)  # exit 2 before Prefect or any heavy work starts
    _services_or_exit(args.params, args.set)  # exit 4 before Prefect starts (tasks/preflight.py)
    _adopt()
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
    _services_or_exit(args.params, args.set)  # exit 4 before Prefect starts (tasks/preflight.py)
    _adopt()
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

    recipe = _recipe_or_exit(args.params, [], checks="store")
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
    # its own process group: on Ctrl-C or SIGTERM the server and every worker it forked are stopped;
    # owned by this process (FRUGALFLOW_OWNER), so if this one is SIGKILLed the next run stops it
    _adopt()
    server = subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True)
    try:
        return server.wait()
    except (KeyboardInterrupt, SystemExit):
        _stop_group(server)
        print("MLflow UI stopped", file=sys.stderr)
        return 0
    finally:
        if server.poll() is None:
            _stop_group(server)


def _stop_group(proc: subprocess.Popen, wait_s: float = 10) -> None:
    """SIGTERM to the process group, up to `wait_s` for the leader, then SIGKILL to what is left."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(wait_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _adopt() -> None:
    """Stop what killed runs left behind (their temporary Prefect servers), then own what this run starts."""
    from tasks.runstate import adopt_children, stop_orphans

    for pid in stop_orphans():
        print(f"stopped process {pid}, left behind by a killed frugalflow run", file=sys.stderr)
    adopt_children()


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


def cmd_team(args) -> int:
    from tasks.team import stack
    from tasks.team.config import TeamError

    try:
        ports = {k: int(v) for k, v in (p.split("=", 1) for p in args.port)}
    except ValueError:
        print(f"frugalflow team: --port takes SERVICE=NUMBER (given: {args.port})", file=sys.stderr)
        return 2
    try:
        if args.action == "up":
            print(f"team up ({args.home or '.team'}):", flush=True)
            rows = stack.up(args.home, args.project, ports, log=lambda line: print(line, flush=True))
        else:
            rows = getattr(stack, args.action)(args.home, args.project)
    except TeamError as exc:
        print(f"frugalflow team {args.action}: {exc}", file=sys.stderr)
        return exc.exit_code
    for row in rows:
        print(f"{row['name']:<15} {row['health']:<9} pid {str(row['pid'] or '-'):<8} {row['address']}")
    if args.action == "up":
        print(f"clients: set -a; . {stack.open_team(args.home, stack.check_project(args.project)).client_env_file}; set +a")
    bad = [r["name"] for r in rows if r["health"] != ("down" if args.action == "down" else "healthy")]
    if bad:
        print(f"frugalflow team {args.action}: not as expected: {', '.join(bad)} (logs in the team folder's logs/)",
              file=sys.stderr)
    return 4 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugalflow", description="Model compression flows with tracking.",
                                     epilog="Exit codes:" + __doc__.split("Exit codes:", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p = sub.add_parser("team", help="team mode on this machine: up, status, down (see infra/README.md)")
    p.add_argument("action", choices=("up", "status", "down"))
    p.add_argument("--home", type=Path, default=None, help="the team folder (default .team in the project)")
    p.add_argument("--project", type=Path, default=None, help="the frugalflow checkout (default: here)")
    p.add_argument("--port", action="append", default=[], metavar="SERVICE=PORT",
                   help="postgres, s3, mlflow or prefect on another port (kept for later commands)")
    p.set_defaults(func=cmd_team)
    p = with_store(sub.add_parser("ui", help="open the MLflow UI on the store"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; map what went wrong to an exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    restore = _sigterm_as_exit()
    try:
        return args.func(args)
    except Exception as exc:
        from tasks.services import exit_code_for

        known = exit_code_for(exc)
        if known is None:
            raise  # a bug: Python prints the traceback and exits 1
        code, message = known
        print(f"frugalflow {args.command}: {message}", file=sys.stderr)
        return code
    finally:
        restore()


def _sigterm_as_exit():
    """SIGTERM raises SystemExit(143) in the main thread, so `finally` blocks and atexit run (MLflow runs
    closed FAILED, Prefect's temporary server and the UI's server stopped); returns the undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
