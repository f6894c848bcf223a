"""The one sequential layer-by-layer calibration driver shared by Wanda, SparseGPT, GPTQ and AWQ.

`run_sequential` catches the inputs (hidden states and every keyword the layer is called
with: attention mask, position ids, rotary position embeddings, ...) of the first decoder
layer by hooking it with a pre-hook that raises, as the reference Catcher does. Then, layer
by layer: forward hooks on the layer's linears (names from `arch_of(model).linears`)
accumulate the statistics the method asks for while the layer runs on every calibration
batch; the method's `solve(layer_index, layer, stats)` updates the weights in place and
returns per-linear stats; the layer is run again with its compressed weights and its
outputs become the next layer's inputs (or, with `propagate=False`, the outputs of the
first run are used as they are).

Linears in one `arch.Smooth` group read the same input tensor (q/k/v, gate/up), so their
statistics are accumulated once and shared: `stats[name]["group"]` lists the names that
share them. Standard statistics over the n calibration tokens x (float32):
  "H"          2/n * sum x x^T (the GPTQ/SparseGPT Hessian)
  "x_norm"     ||x_j||_2 per input channel (Wanda)
  "x_abs_mean" mean |x_j| per input channel (AWQ)
  "n"          n
A method may also pass `accumulate(name, inp, out)`, called for every linear on every batch.

Memory: the model stays where it is; each layer visits `device` in turn, and the calibration
activations stay on `device` when they fit (CUDA) or on the CPU otherwise.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from frugalflow.arch import Arch, arch_of, decoder_layers

STANDARD_STATS = ("H", "x_norm", "x_abs_mean")
Solve = Callable[[int, nn.Module, dict], dict]


class _Caught(Exception):
    """Raised by the pre-hook on the first decoder layer once its inputs are recorded."""


def input_groups(arch: Arch) -> list[tuple[str, ...]]:
    """The layer's linears grouped by shared input, in execution order (from arch.smooth)."""
    groups, seen = [], set()
    for name in arch.linears:
        if name in seen:
            continue
        group = next((s.linears for s in arch.smooth if name in s.linears), (name,))
        groups.append(tuple(group))
        seen.update(group)
    return groups


def _to(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _optional_modules(model: nn.Module, names) -> list[nn.Module]:
    mods = []
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, nn.Module):
            mods.append(mod)
    return mods


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int,
                   store: torch.device) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]]]:
    """First decoder layer's hidden states (one tensor per batch, on `store`) and its other
    positional/keyword arguments (per batch, on `device`)."""
    arch = arch_of(model)
    layer0 = decoder_layers(model)[0]
    front = _optional_modules(model, (arch.embed, *arch.pre_layers)) + [layer0]
    homes = [_device_of(m) for m in front]
    for m in front:
        m.to(device)
    inputs, extras = [], []

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.to(store))
        extras.append((tuple(args[1:]), dict(kwargs)))
        raise _Caught

    handle = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(windows[start:start + batch_size].to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
        for m, home in zip(front, homes):
            m.to(home)
    return inputs, extras


def _activation_store(device: torch.device, windows: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.device:
    """Keep activations (inputs and outputs) on the GPU when they take under a third of free memory."""
    if device.type != "cuda":
        return device
    need = 2 * windows.numel() * hidden * torch.finfo(dtype).bits // 8
    free, _total = torch.cuda.mem_get_info(device)
    return device if need < free / 3 else torch.device("cpu")


class _Accumulator:
    """Running sums for one input group; `finish()` turns them into the standard stats."""

    def __init__(self, in_features: int, needs, device: torch.device, h_stride: int = 1,
                 matmul_dtype: torch.dtype | None = None):
        self.n = self.n_h = 0
        self.h_stride = h_stride
        self.matmul_dtype = matmul_dtype
        self.sums = {}
        if "H" in needs:
            self.sums["H"] = torch.zeros(in_features, in_features, device=device)
        if "x_norm" in needs:
            self.sums["x_norm"] = torch.zeros(in_features, device=device)
        if "x_abs_mean" in needs:
            self.sums["x_abs_mean"] = torch.zeros(in_features, device=device)

    def add(self, x: torch.Tensor) -> None:
        X = x.reshape(-1, x.shape[-1])
        self.n += X.shape[0]
        if "H" in self.sums:
            Xh = X[::self.h_stride].to(self.matmul_dtype or torch.float32)
            self.n_h += Xh.shape[0]
            if self.matmul_dtype is None:
                self.sums["H"].addmm_(Xh.T, Xh)
            else:  # one batch's product in that dtype, the running sum in float32
                self.sums["H"].add_(Xh.T @ Xh)
        if "x_norm" in self.sums:
            self.sums["x_norm"].add_(X.float().square().sum(0))
        if "x_abs_mean" in self.sums:
            self.sums["x_abs_mean"].add_(X.abs().sum(0, dtype=torch.float32))

    def finish(self) -> dict:
        out = {"n": self.n}
        n = max(self.n, 1)
        if "H" in self.sums:
            out["H"] = self.sums["H"].mul_(2.0 / max(self.n_h, 1))
        if "x_norm" in self.sums:
            out["x_norm"] = self.sums["x_norm"].sqrt_()
        if "x_abs_mean" in self.sums:
            out["x_abs_mean"] = self.sums["x_abs_mean"].div_(n)
        return out


def _run_layer(layer: nn.Module, inputs, extras, device, store, autocast: torch.dtype | None) -> list[torch.Tensor]:
    outs = []
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        for x, (args, kwargs) in zip(inputs, extras):
            y = layer(x.to(device), *args, **kwargs)
            outs.append((y[0] if isinstance(y, (tuple, list)) else y).to(store, x.dtype))
    return outs


@torch.no_grad()
def run_sequential(model: nn.Module, windows: torch.Tensor, solve: Solve, needs=("H",),
                   accumulate: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
                   device: str | torch.device = "cpu", batch_size: int = 8, propagate: bool = True,
                   on_progress: Callable[[int, int], None] | None = None, h_stride: int = 1,
                   autocast: torch.dtype | None = None) -> dict[str, dict]:
    """Calibrate `model` layer by layer on `windows` (LongTensor [N, L]).

    `needs`: standard stats to accumulate (subset of STANDARD_STATS). `solve(i, layer, stats)`
    gets `stats[linear name relative to the layer]` and returns per-linear dicts; the result
    maps full dotted names (as in `compressible_linears`) to them. `on_progress(i, n_layers)`
    is called after layer i (0-based) is done. `h_stride` > 1 builds H from every h_stride-th
    token only: a cheap estimate for methods that use H as a diagnostic. `autocast` (e.g. torch.bfloat16):
    the layer runs under torch.autocast to that dtype (matmuls on AMX / tensor cores) and each batch's
    x^T x is a product in that dtype; the weights, the residual stream and the sums stay float32.
    """
    unknown = set(needs) - set(STANDARD_STATS)
    if unknown:
        raise ValueError(f"unknown stats {sorted(unknown)}; known: {', '.join(STANDARD_STATS)}")
    arch = arch_of(model)
    device = torch.device(device)
    layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    try:
        hidden = layers[0].get_submodule(arch.linears[0]).in_features
        store = _activation_store(device, windows, hidden, next(model.parameters()).dtype)
        inputs, extras = capture_inputs(model, windows, device, batch_size, store)
        extras = [_to(e, device) for e in extras]
        result: dict[str, dict] = {}
        for i, layer in enumerate(layers):
            home = _device_of(layer)
            layer.to(device)
            solved, inputs = calibrate_layer(i, layer, arch, inputs, extras, solve, needs, accumulate, device, store,
                                             propagate and i + 1 < len(layers), h_stride, autocast)
            for name, s in solved.items():
                result[f"{arch.layers}.{i}.{name}"] = s
            layer.to(home)
            if on_progress is not None:
                on_progress(i, len(layers))
        return result
    finally:
        model.train(was_training)


def calibrate_layer(i: int, layer: nn.Module, arch: Arch, inputs: list[torch.Tensor], extras: list, solve: Solve,
                    needs=("H",), accumulate=None, device: torch.device = torch.device("cpu"),
                    store: torch.device = torch.device("cpu"), propagate: bool = True,
                    h_stride: int = 1, autocast: torch.dtype | None = None) -> tuple[dict, list[torch.Tensor]]:
    """One step of the sequential driver on decoder layer `i` (already on `device`): accumulate the
    stats on `inputs`, `solve`, and return (solve's per-linear dicts, the next layer's inputs: the
    outputs of the compressed layer when `propagate`, else of the layer as it came)."""
    accs, handles = {}, []
    for group in input_groups(arch):
        first = layer.get_submodule(group[0])
        acc = accs[group] = _Accumulator(first.in_features, needs, device, h_stride, autocast)
        if needs:
            handles.append(first.register_forward_hook(lambda _m, inp, _out, acc=acc: acc.add(inp[0])))
    if accumulate is not None:
        for name in arch.linears:
            handles.append(layer.get_submodule(name).register_forward_hook(
                lambda _m, inp, out, name=name: accumulate(name, inp[0], out)))
    try:
        outputs = _run_layer(layer, inputs, extras, device, store, autocast)
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for group, acc in accs.items():
        shared = acc.finish()
        for name in group:
            stats[name] = {**shared, "group": group}
    del accs
    solved = solve(i, layer, stats) or {}
    del stats
    if propagate:
        outputs = _run_layer(layer, inputs, extras, device, store, autocast)
    return solved, outputs


@contextmanager
def column_loop_threads(device: torch.device) -> Iterator[None]:
    """One CPU thread for the column-by-column loops of GPTQ/SparseGPT and the Hessian inverse:
    their many small ops gain nothing from a second thread and crawl when the cores are shared."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def lazy_step(blocksize: int, multiple: int, device: torch.device) -> int:
    """Columns per lazy batch in the GPTQ/SparseGPT loops: 32 on the CPU (narrow rank-1 updates stay
    in cache; twice as fast as 128), `blocksize` elsewhere; a multiple of `multiple` (N:M's m).
    Only the speed depends on it."""
    step = min(blocksize, 32) if device.type == "cpu" else blocksize
    return max(multiple, step - step % multiple)


def hessian_inverse_upper(H: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp I)^-1 with dead inputs (H_ii = 0) set to H_ii = 1,
    and the dead mask. Dampening grows tenfold while the factorisation fails. H is not modified;
    besides it, at most two n x n matrices live at once (layer streaming keeps 7B-sized MLP
    Hessians within its memory budget this way)."""
    with column_loop_threads(H.device):  # LAPACK's cholesky_inverse crawls with 2 threads on a busy CPU
        return _hessian_inverse_upper(H.float(), dampening)


def _hessian_inverse_upper(H: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    dead = torch.diag(H) == 0
    diag = torch.arange(H.shape[0], device=H.device)
    diag_h = torch.diag(H).clone()
    diag_h[dead] = 1
    damp = dampening * torch.mean(diag_h)
    for _ in range(6):
        Hd = H.clone()
        Hd[dead, dead] = 1
        Hd[diag, diag] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0:
                return U, dead
        damp = damp * 10 if damp > 0 else torch.tensor(1e-6, device=H.device)
    raise RuntimeError("Hessian is not positive definite even with heavy dampening")


def relative_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor, rows: int = 1024) -> float:
    """||W X - W' X||^2 / ||W X||^2 over the calibration inputs, from H = 2/n X^T X; `rows` rows of W
    at a time, so that the temporaries stay small beside a large H. The products in H's dtype
    (bfloat16 where calibration ran in it), the sums in float32."""
    num = den = 0.0
    for r in range(0, W.shape[0], rows):
        w = W[r:r + rows].float()
        e = W_new[r:r + rows].float() - w
        num += ((e.to(H.dtype) @ H).float() * e).sum().item()
        den += ((w.to(H.dtype) @ H).float() * w).sum().item()
    return num / den if den > 0 else 0.0
