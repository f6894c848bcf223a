"""`frugalflow`: the command line (a typer app; `cmd_*` hold what each command does).

    frugalflow validate [FILE | -p FILE] [-s K=V]   check a recipe, print a summary
    frugalflow run [-p FILE] [-s KEY=VALUE ...]      run the nightly flow once (--force: register even if unchanged)
    frugalflow sweep [-p FILE] -g KEY=V1,V2 ...      candidates over a grid; the Pareto-best passing one promoted
    frugalflow schedule [-p FILE] [--check]          serve the nightly deployment (needs PREFECT_API_URL)
    frugalflow runs [-n N]                           recent runs: recipe, verdict, ppl, size, speed
    frugalflow compare RUN RUN ...                   runs side by side (ids or their first characters)
    frugalflow promote VERSION --reason TEXT         move `champion` by hand
    frugalflow rollback --reason TEXT                move `champion` back to the previous one
    frugalflow ui [--port 5000]                      the MLflow UI on the local store
    frugalflow gc [--dry-run]                        delete what `retention` allows (old versions, stage outputs, model files)
    frugalflow export DIR|models:/NAME@ALIAS --format F --out PATH
                                                     a model as GGUF (llama.cpp) or compressed-tensors (vLLM)
    frugalflow team up|status|down [--home DIR]      team mode on this machine: PostgreSQL, S3, MLflow, Prefect, worker

Exit codes:
    0  done
    2  bad input: the recipe, an argument or a file named (missing, unreadable, invalid); nothing started
    3  corrupt or inconsistent data: model weights, a cache entry, a checkpoint, a DVC output
    4  a service that cannot be reached or refuses: MLflow store or server, S3, Prefect API, a full disk
    1  anything else: a bug, printed with its traceback
Every message names the key, file or service, the value found and what is allowed or what to do.
SIGTERM stops a command as Ctrl-C does: runs are closed FAILED, servers it started are stopped;
it exits 143 after SIGTERM, 130 after Ctrl-C (SIGINT), also when the signal reaches its whole
process group (Ctrl-C in a terminal, `timeout`, a service manager).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.exceptions import TyperException

from flows.secret_overrides import split as split_secrets
from frugalflow.config import RecipeError
from frugalflow.recipe_io import RecipeSource, load_recipe


def _recipe_or_exit(path: str | RecipeSource, overrides: list[str], *, checks: str = "run"):
    """The recipe (recipe_io.load_recipe, the one loader) or exit 2. checks: "run" (everything a run
    refuses before heavy work: the project, DVC-owned sections, chaining, local inputs, the schedule),
    "file" (the same where the file has no project around it: `validate`), "schema" (the file alone:
    commands that only read the tracking store). `path`: a file, or one already read."""
    try:
        return load_recipe(path, overrides, checks=checks)
    except RecipeError as exc:
        print(f"invalid recipe {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _read_or_exit(path: str) -> RecipeSource:
    """The recipe file read once, for commands that validate it more than once (`sweep`), or exit 2."""
    try:
        return RecipeSource.read(path)
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


def _services_or_exit(recipe, source: RecipeSource) -> None:
    """MLflow, the S3 buckets and the Prefect API the run will use answer; else ServiceDown (exit 4)."""
    from tasks.preflight import preflight_recipe

    preflight_recipe(recipe, source.root)


def cmd_run(args) -> int:
    source = _read_or_exit(args.params)
    recipe = _recipe_or_exit(source, args.set)  # exit 2 before Prefect or any heavy work starts
    _services_or_exit(recipe, source)  # exit 4 before Prefect starts (tasks/preflight.py)
    _before_flow()
    from flows.nightly import compression_flow

    result = compression_flow(params=args.params, overrides=split_secrets(args.set), force=args.force)
    print(run_summary(result))
    return 0


def run_summary(result: dict) -> str:
    """What `frugalflow run` prints about the flow's result."""
    same = result.get("unchanged")
    if same:
        return (f"\nrun {result['run_id']}: unchanged: same inputs as version {same['version']}; nothing registered\n"
                f"  (final stage {same['final_stage']}, evaluation and gates as then; `frugalflow run --force` "
                "registers anyway)")
    promo, c, b = result["promotion"], result["candidate"], result["baseline"]
    lines = [f"\nrun {result['run_id']}: verdict {'PASS' if result['verdict']['passed'] else 'FAIL'}",
             *(f"  - {reason}" for reason in result["verdict"]["reasons"]),
             f"  ppl {b['ppl']:.3f} -> {c['ppl']:.3f}; size {b['size_mb']:.1f} -> {c['size_mb']:.1f} MB; "
             f"decode {b['decode_tps']:.1f} -> {c['decode_tps']:.1f} tok/s"]
    if promo["registered"]:
        lines.append(f"  registered version {promo['version']}" + (" and promoted to champion" if promo["champion"] else ""))
    return "\n".join(lines)


def cmd_sweep(args) -> int:
    source = _read_or_exit(args.params)  # the one parse of the recipe: the candidates and the flow reuse it
    recipe = _recipe_or_exit(source, args.set)  # exit 2 before Prefect or any heavy work starts
    from flows.sweep import candidate_recipes, runner_for, sweep_flow
    from flows.tables import render_sweep

    try:
        candidates = candidate_recipes(source, args.grid, args.set)  # every grid point, before any work
    except RecipeError as exc:
        print(f"invalid sweep {exc}", file=sys.stderr)
        return 2
    print(f"sweep: {len(candidates)} candidates: {', '.join(c.label for c in candidates)}")
    _services_or_exit(recipe, source)  # exit 4 before Prefect starts (tasks/preflight.py)
    _before_flow()
    workers = args.parallel or recipe.sweep.max_parallel
    cluster = getattr(args, "cluster", None) or recipe.sweep.cluster
    runner = runner_for(workers, cluster)  # exit 2/4 on a bad or silent cluster address
    result = sweep_flow.with_options(task_runner=runner)(
        params=args.params, grid=args.grid, overrides=split_secrets(args.set), source=source)
    print(f"\nsweep {result['run_id']}: {len(result['candidates'])} candidates, selected: {result['selected'] or 'none'}")
    print(render_sweep(result["candidates"]))
    print("(* selected, P on the Pareto front)")
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
    """(client, registered model name, tracking URI). The store is --tracking-uri, else
    MLFLOW_TRACKING_URI, else the recipe's; the model is --model, else the recipe's. With both
    given the recipe is not read, so the command works from any folder."""
    from tasks import tracking as T

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    model = getattr(args, "model", None)
    if uri and model:
        return T.connect(uri, quick=True), model, uri
    if not Path(args.params).is_file():
        print(f"invalid recipe {args.params}: file not found; outside a project give the store and the model: "
              "--tracking-uri URI (or MLFLOW_TRACKING_URI) and --model NAME", file=sys.stderr)
        raise SystemExit(2)
    recipe = _recipe_or_exit(args.params, [], checks="schema")
    uri = uri or T.resolve_uri(recipe.tracking.uri, Path(args.params).resolve().parent)
    return T.connect(uri, quick=True), model or recipe.registry.model_name, uri


def cmd_runs(args) -> int:
    from flows.tables import render_table
    from tasks.run_table import columns_for, recent_runs

    client, model, _ = _client(args)
    rows = recent_runs(client, model, args.n)
    print(render_table(rows, columns_for(rows)))
    return 0


def cmd_compare(args) -> int:
    from flows.tables import render_compare
    from tasks.compare import compare_runs

    client, model, _ = _client(args)
    print(render_compare(compare_runs(client, args.runs, model)))
    return 0


def cmd_promote(args) -> int:
    from tasks.registry import promote

    client, model, _ = _client(args)
    entry = promote(client, model, args.version, args.reason, by="cli")
    if entry["previous"] == entry["version"]:
        print(f"champion of {model}: version {entry['version']} already; nothing moved or recorded")
    else:
        print(f"champion of {model}: version {entry['previous']} -> {entry['version']} "
              f"at {entry['at']} ({entry['reason']})")
    return 0


def cmd_rollback(args) -> int:
    from tasks.registry import rollback

    client, model, _ = _client(args)
    entry = rollback(client, model, args.reason)
    print(f"champion of {model}: version {entry['previous']} -> {entry['version']} "
          f"at {entry['at']} ({entry['reason']})")
    return 0


def cmd_ui(args) -> int:
    from frugalflow.errors import BadInput
    from tasks.team.procs import port_free

    _, _, uri = _client(args)
    if not port_free(args.host, args.port):
        raise BadInput(f"--port {args.port}: cannot listen on {args.host}:{args.port} (in use, or --host is not an "
                       f"address of this machine); pick a free port with --port")
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


def _before_flow() -> None:
    """What `run` and `sweep` do before their flow starts: clean up after killed runs, own what this
    run starts, and keep Prefect's temporary API server out of this process group."""
    from flows.temporary_api import start_in_own_session

    _adopt()
    start_in_own_session()


def _adopt() -> None:
    """Stop what killed runs left behind (their temporary Prefect servers), then own what this run starts."""
    from tasks.runstate import adopt_children, stop_orphans

    for pid in stop_orphans():
        print(f"stopped process {pid}, left behind by a killed frugalflow run", file=sys.stderr)
    adopt_children()


def cmd_export(args) -> int:
    from frugalflow.export import ExportError, export

    options = dict(float_type=args.float_type, require_exact=args.require_exact, overwrite=args.overwrite)
    try:
        if args.model_dir.startswith("models:/"):  # a registered version: its attached file, else an export of it
            from tasks import tracking as T
            from tasks.serving import fetch

            uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # else the recipe's store
            client = T.connect(uri, quick=True) if uri else _client(args)[0]
            summary = fetch(client, args.model_dir, args.format, args.out, **options)
            print(f"{args.model_dir} is {summary['name']} version {summary['version']}; "
                  + ("downloaded the file the flow attached to it" if summary["attached"] else "exported its model"))
        else:
            summary = export(args.format, args.model_dir, args.out, **options)
    except (ExportError, FileExistsError) as exc:
        print(f"frugalflow export: {exc}", file=sys.stderr)
        return 2
    if summary.get("attached"):
        print(f"wrote {summary['path']} ({summary['format']}, {summary['bytes'] / 1e6:.1f} MB)")
        return 0
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


def _one_of(*choices: str):
    """A parser refusing anything else the way argparse did: `invalid choice: 'x' (choose from a, b)`."""
    def parse(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"invalid choice: {value!r} (choose from {', '.join(choices)})")
        return value
    return parse


def _integer(low: int, high: int | None = None):
    """A parser for an integer from `low` to `high` (no upper bound when None)."""
    allowed = f"{low} to {high}" if high is not None else f"{low} or more"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not a valid integer") from None
        if number < low or (high is not None and number > high):
            raise typer.BadParameter(f"{number} is out of range (allowed: {allowed})")
        return number
    return parse


EXIT_CODES = "Exit codes:" + __doc__.split("Exit codes:", 1)[1]
app = typer.Typer(name="frugalflow", help="Model compression flows with tracking.", add_completion=False,
                  rich_markup_mode=None, pretty_exceptions_enable=False, no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  epilog="\b\n" + EXIT_CODES.replace("\n\n", "\n\n\b\n"))

# the options several commands share
Params = Annotated[str, typer.Option("-p", "--params", metavar="FILE", help="the recipe file")]
Sets = Annotated[Optional[list[str]], typer.Option("-s", "--set", metavar="KEY=VALUE",
                                                    help="override a recipe key (repeatable)")]
TrackingUri = Annotated[Optional[str],
                        typer.Option("--tracking-uri", metavar="URI", help="default: MLFLOW_TRACKING_URI, else "
                                                                          "tracking.uri from the params")]
Model = Annotated[Optional[str], typer.Option("--model", metavar="NAME", help="the registered model (default: "
                                              "registry.model_name from the params; with --tracking-uri no recipe "
                                              "is read)")]


@app.command("validate", help="check a recipe file")
def validate_command(file: Annotated[str, typer.Argument(metavar="FILE")] = "params.yaml",
                     params: Annotated[Optional[str], typer.Option(
                         "-p", "--params", metavar="FILE", help="the recipe file, as for run (instead of FILE)")] = None,
                     set_: Sets = None) -> int:
    return cmd_validate(Namespace(file=file, params=params, set=list(set_ or [])))


@app.command("run", help="run the compression flow once")
def run_command(params: Params = "params.yaml", set_: Sets = None,
                force: Annotated[bool, typer.Option(
                    "--force", help="register the candidate even when a version has the same inputs "
                    "(final stage, evaluation, gates)")] = False) -> int:
    return cmd_run(Namespace(params=params, set=list(set_ or []), force=force))


@app.command("sweep", help="run a grid of candidates; promote the Pareto-best passing one")
def sweep_command(params: Params = "params.yaml",
                  grid: Annotated[Optional[list[str]], typer.Option(
                      "-g", "--grid", metavar="KEY=V1,V2",
                      help="values of one recipe key (repeat for more keys; adds to sweep.grid)")] = None,
                  set_: Sets = None,
                  parallel: Annotated[Optional[int], typer.Option(
                      parser=_integer(1), metavar="N", help="candidates at once (default sweep.max_parallel)")] = None,
                  cluster: Annotated[Optional[str], typer.Option(
                      metavar="tcp://HOST:PORT", help="send candidates to this Dask scheduler "
                      "(default: sweep.cluster, else local processes)")] = None) -> int:
    return cmd_sweep(Namespace(params=params, grid=list(grid or []), set=list(set_ or []), parallel=parallel,
                               cluster=cluster))


@app.command("schedule", help="serve the nightly deployment (cron and time zone from params)")
def schedule_command(file: Annotated[Optional[str], typer.Argument(metavar="FILE", help="the recipe file (or -p)")] = None,
                     params: Params = "params.yaml", set_: Sets = None,
                     check: Annotated[bool, typer.Option(
                         "--check", help="validate the schedule, print the next runs, serve nothing")] = False) -> int:
    return cmd_schedule(Namespace(params=file or params, set=list(set_ or []), check=check))


@app.command("runs", help="recent runs")
def runs_command(params: Params = "params.yaml", tracking_uri: TrackingUri = None, model: Model = None,
                 n: Annotated[int, typer.Option("-n", parser=_integer(1), metavar="N", help="how many")] = 10) -> int:
    return cmd_runs(Namespace(params=params, tracking_uri=tracking_uri, model=model, n=n))


@app.command("compare", help="runs side by side")
def compare_command(runs: Annotated[list[str], typer.Argument(
                        metavar="RUN...", help="run ids or their first characters (frugalflow runs)")],
                    params: Params = "params.yaml", tracking_uri: TrackingUri = None, model: Model = None) -> int:
    return cmd_compare(Namespace(params=params, tracking_uri=tracking_uri, model=model, runs=list(runs)))


Reason = Annotated[str, typer.Option("--reason", metavar="TEXT", help="why (kept in the alias history)")]


@app.command("promote", help="move champion to a version")
def promote_command(version: Annotated[str, typer.Argument(metavar="VERSION")], reason: Reason, params: Params = "params.yaml",
                    tracking_uri: TrackingUri = None, model: Model = None) -> int:
    return cmd_promote(Namespace(params=params, tracking_uri=tracking_uri, model=model, version=version,
                                 reason=reason))


@app.command("rollback", help="move champion back")
def rollback_command(reason: Reason, params: Params = "params.yaml", tracking_uri: TrackingUri = None,
                     model: Model = None) -> int:
    return cmd_rollback(Namespace(params=params, tracking_uri=tracking_uri, model=model, reason=reason))


@app.command("export", help="write a model as GGUF or compressed-tensors for serving")
def export_command(model_dir: Annotated[str, typer.Argument(
                       metavar="MODEL", help="a dense or packed model directory (with its tokenizer), or a registered "
                                             "version: models:/NAME@ALIAS or models:/NAME/VERSION")],
                   format_: Annotated[str, typer.Option("--format", parser=_one_of("gguf", "compressed-tensors"),
                                                        metavar="gguf|compressed-tensors")],
                   out: Annotated[str, typer.Option(metavar="PATH", help="the .gguf file, or the compressed-tensors directory")],
                   float_type: Annotated[str, typer.Option(
                       parser=_one_of("f16", "f32"), metavar="f16|f32",
                       help="GGUF type of embeddings and of layers without a quantized GGUF type")] = "f16",
                   require_exact: Annotated[bool, typer.Option(
                       "--require-exact", help="refuse instead of writing a quantized layer dequantized")] = False,
                   overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
                   params: Params = "params.yaml", tracking_uri: TrackingUri = None) -> int:
    return cmd_export(Namespace(model_dir=model_dir, format=format_, out=out, float_type=float_type,
                                require_exact=require_exact, overwrite=overwrite, params=params,
                                tracking_uri=tracking_uri))


@app.command("team", help="team mode on this machine: up, status, down (see infra/README.md)")
def team_command(action: Annotated[str, typer.Argument(parser=_one_of("up", "status", "down"), metavar="up|status|down")],
                 home: Annotated[Optional[Path],
                                 typer.Option(metavar="DIR", help="the team folder (default .team in the project)")]
                 = None,
                 project: Annotated[Optional[Path], typer.Option(metavar="DIR", help="the frugalflow checkout (default: here)")]
                 = None,
                 port: Annotated[Optional[list[str]], typer.Option(
                     metavar="SERVICE=PORT",
                     help="postgres, s3, mlflow or prefect on another port (kept for later commands)")] = None) -> int:
    return cmd_team(Namespace(action=action, home=home, project=project, port=list(port or [])))


@app.command("ui", help="open the MLflow UI on the store")
def ui_command(params: Params = "params.yaml", tracking_uri: TrackingUri = None,
               host: Annotated[str, typer.Option(metavar="HOST")] = "127.0.0.1",
               port: Annotated[int, typer.Option(parser=_integer(1, 65535), metavar="PORT")] = 5000) -> int:
    return cmd_ui(Namespace(params=params, tracking_uri=tracking_uri, host=host, port=port))


@app.command("gc", help="delete what the recipe's retention allows: old versions, stage outputs, runs' model files")
def gc_command(params: Params = "params.yaml", set_: Sets = None, tracking_uri: TrackingUri = None,
               dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan, delete nothing")] = False) -> int:
    from flows.retention import cmd_gc

    return cmd_gc(params, list(set_ or []), tracking_uri, dry_run)


def _parse_and_run(argv: list[str]) -> int:
    """Parse `argv` with the typer app and run the command; usage errors exit 2 (message on
    stderr), --help exits 0, as argparse did."""
    command = typer.main.get_command(app)
    try:
        with command.make_context("frugalflow", list(argv)) as ctx:
            return command.invoke(ctx)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort as exc:  # click turns Ctrl-C into Abort: give it back
        raise KeyboardInterrupt from exc.__context__
    except TyperException as exc:  # a usage error: the message on stderr, exit 2
        exc.show()
        raise SystemExit(getattr(exc, "exit_code", 2)) from None


STOPPED_BY_SIGTERM = 128 + 15  # the exit status of a command stopped by SIGTERM, as a shell reports it


def main(argv: list[str] | None = None) -> int:
    """Run one command; map what went wrong to an exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    # Prefect's temporary API server gets 20 s to start by default, which a loaded machine misses
    # (measured: a `run` beside a test suite on 2 cores failed "Timed out while attempting to connect to
    # ephemeral Prefect API server"); set before Prefect is imported, which reads it then
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    restore = _sigterm_as_exit()
    try:
        return _parse_and_run(argv)
    except Exception as exc:
        from tasks.services import exit_code_for

        known = exit_code_for(exc)
        if known is None:
            raise  # a bug: Python prints the traceback and exits 1
        code, message = known
        from frugalflow.redact import redact

        print(f"frugalflow {command}: {redact(message)}", file=sys.stderr)
        return code
    except KeyboardInterrupt:  # Ctrl-C: what the flow recorded is closed as for SIGTERM; no traceback
        print(f"frugalflow {command}: interrupted (SIGINT)", file=sys.stderr)
        return 128 + 2
    except SystemExit as exc:
        if exc.code == STOPPED_BY_SIGTERM:
            print(f"frugalflow {command}: stopped (SIGTERM)", file=sys.stderr)
        raise
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
        raise SystemExit(STOPPED_BY_SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
