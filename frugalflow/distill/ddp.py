"""Distillation on several processes: DistributedDataParallel, gloo on the CPU, nccl on GPUs.

A distill stage with `processes: N` (N > 1) runs its training in N processes on this host:
`launch_stage` starts `python -m torch.distributed.run --standalone --nproc_per_node N -m
frugalflow.distill.ddp SPEC.json`, and every rank runs the same stage code. Inside a process
group `trainer.distill` wraps the student in DDP: every rank draws the same global batch of
`batch_size` crops (same seed, same generator) and trains on its 1/N slice; DDP averages the
gradients, so N processes follow the one-process run with the same `batch_size` (up to float
summation order). Masks and grids are buffers of every rank's student, broadcast from rank 0
when DDP wraps it. Rank 0 writes the checkpoint (which does not depend on N: a run may resume
with another process count), the output model and the stage's stats; every rank reads the
checkpoint when it starts. Progress reaches the caller as JSON lines on rank 0's stdout.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

_PREFIX = "frugalflow-ddp "


# --------------------------------------------------------------------------- inside a process group
def rank_and_size() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    nccl when `device` is CUDA (one GPU per local rank), gloo otherwise. Returns this rank's device."""
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"processes: local rank {local} has no GPU ({torch.cuda.device_count()} visible); "
                             "use at most one process per GPU")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return "cpu"


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in DDP (parameters and buffers, masks and grids included, broadcast from rank 0)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # buffers (masks, grids) never change during training: one broadcast at wrapping is enough
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def local_slice(batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch (its size a multiple of the world size)."""
    rank, size = rank_and_size()
    n = batch.shape[0] // size
    return batch[rank * n:(rank + 1) * n]


def no_sync(model: torch.nn.Module, skip: bool):
    """DDP's no_sync while accumulating micro-batches (gradients reduced on the last one only)."""
    return model.no_sync() if skip and hasattr(model, "no_sync") else contextlib.nullcontext()


def mean_across(values: list[float]) -> list[float]:
    """Each value averaged over the ranks (every rank gets the result)."""
    _, size = rank_and_size()
    if size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / size).tolist()


def barrier() -> None:
    if rank_and_size()[1] > 1:
        dist.barrier()


# --------------------------------------------------------------------------- launching
def split_event(line: str) -> tuple[dict | None, str]:
    """A line of torchrun's output -> (rank 0's progress event or None, the other text on the line:
    another rank's output can land after the event, before its newline)."""
    if not line.startswith(_PREFIX):
        return None, line
    event, end = json.JSONDecoder().raw_decode(line, len(_PREFIX))
    return event, line[end:]


def launch_stage(stage, model_dir: Path, out_dir: Path, ctx: dict) -> dict:
    """Run a distill stage's `trainer.run` in `stage.processes` processes under torchrun; returns
    rank 0's stats. ctx as in stages.run_stage; its `report` gets rank 0's progress live."""
    report: Callable[[str, dict], None] = ctx["report"]
    with tempfile.TemporaryDirectory(prefix="frugalflow-ddp-") as tmp:
        spec = {"stage": stage.model_dump(mode="json"), "model_dir": str(model_dir), "out_dir": str(out_dir),
                "data_dir": str(ctx["data_dir"]), "teacher_dir": str(ctx["teacher_dir"]), "device": ctx["device"],
                "seed": ctx["seed"], "pruned": ctx["pruned"], "result": str(Path(tmp) / "result.json"),
                "checkpoint_dir": None if ctx.get("checkpoint_dir") is None else str(ctx["checkpoint_dir"])}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stage.processes}",
               "-m", "frugalflow.distill.ddp", str(spec_path)]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // stage.processes)))
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: the ranks talk over loopback
        tail: collections.deque[str] = collections.deque(maxlen=40)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            for line in proc.stdout:
                event, rest = split_event(line)
                if event is not None:
                    report(event["message"], event["metrics"])
                if rest.strip():
                    tail.append(rest.rstrip("\n"))
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        result = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).is_file() else None
    if result is not None and "error" in result:
        kind = ValueError if result["error"] == "ValueError" else RuntimeError
        raise kind(f"distillation on {stage.processes} processes: {result['message']}")
    if rc != 0 or result is None:
        raise RuntimeError(f"distillation on {stage.processes} processes (torchrun) exited with {rc}; "
                           "last output:\n" + "\n".join(tail))
    return result["stats"]


def main(argv: list[str] | None = None) -> int:
    """One rank of a `launch_stage` run (started by torchrun)."""
    from pydantic import TypeAdapter

    from frugalflow import config as C
    from frugalflow import stages
    from frugalflow.data import load_windows
    from frugalflow.distill import trainer

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    stage = TypeAdapter(C.Stage).validate_python(spec["stage"])
    device = init_from_env(stages.resolve_device(spec["device"]))
    rank, _ = rank_and_size()

    def report(message: str, metrics: dict) -> None:
        if rank == 0:
            # one write, newline included: the other ranks' output shares the pipe (print writes the
            # newline separately, and a warning from rank 1 once landed between the two)
            sys.stdout.write(_PREFIX + json.dumps({"message": message, "metrics": metrics}, default=float) + "\n")
            sys.stdout.flush()

    ctx = {"device": device, "data_dir": Path(spec["data_dir"]), "teacher_dir": Path(spec["teacher_dir"]),
           "seed": spec["seed"], "checkpoint_dir": spec["checkpoint_dir"], "pruned": spec["pruned"],
           "report": report, "calib": lambda: load_windows(spec["data_dir"], "calib")}
    torch.manual_seed(spec["seed"])
    try:
        stats = trainer.run(stage, Path(spec["model_dir"]), Path(spec["out_dir"]), ctx).stats
        if rank == 0:
            Path(spec["result"]).write_text(json.dumps({"stats": stats}, default=float))
        return 0
    except Exception as exc:
        if rank == 0:
            kind = "ValueError" if isinstance(exc, ValueError) else type(exc).__name__
            Path(spec["result"]).write_text(json.dumps({"error": kind, "message": str(exc)}))
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
