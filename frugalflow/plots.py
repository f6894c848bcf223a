"""Report figures as PNG files (matplotlib Figure objects rendered by Agg; no pyplot, so no
global backend or figure state, safe in Prefect worker threads).

Every function takes plain data, writes one PNG of a fixed pixel size (`SIZE` at `DPI`)
and returns its path, or returns None without writing when there is nothing to plot. The
trend of a metric over the last nights (`plot_trend`) is an SVG instead: each point is a link to
its run.

Candidates are dicts with `ppl`, `size_mb`, `decode_tps` (any may be missing), an
optional `label` and optional `passed` (the gate verdict); the base model is a dict of
the same metrics.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib import rc_context
from matplotlib.figure import Figure

from frugalflow.pareto import pareto_front

DPI = 100
SIZE = (8.0, 5.0)  # inches: 800 x 500 pixels
# per-linear error keys in stats.json: every method records frugalflow.method.ERROR_KEY today;
# runs recorded before that used AWQ's and the weight-space names, still read for old runs
ERROR_KEYS = ("recon_error", "awq_error", "rel_error")
LABELS = {"ppl": "perplexity (lower is better)", "size_mb": "size on disk, MB (lower is better)",
          "decode_tps": "decode tokens/s (higher is better)"}


def _num(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _figure() -> Figure:
    return Figure(figsize=SIZE, dpi=DPI, layout="constrained")


def plot_tradeoff(candidates: Sequence[Mapping], path: str | Path, x: str, *, y: str = "ppl",
                  maximize_x: bool = False, current: int | None = None, baseline: Mapping | None = None,
                  title: str | None = None) -> Path | None:
    """`y` (minimized) against `x` for every candidate holding both, the Pareto front as a
    line through highlighted, labelled points; candidate `current` (an index) and the base
    model marked. None when no candidate holds both metrics."""
    pts = [(i, _num(c.get(x)), _num(c.get(y))) for i, c in enumerate(candidates)]
    pts = [(i, px, py) for i, px, py in pts if px is not None and py is not None]
    if not pts:
        return None
    front = set(pareto_front(candidates, minimize=(y,) + (() if maximize_x else (x,)),
                             maximize=(x,) if maximize_x else ()))
    fig = _figure()
    ax = fig.add_subplot()
    for passed, style in ((True, dict(color="tab:blue", label="candidate (passed gates)")),
                          (False, dict(color="tab:gray", label="candidate (failed gates)")),
                          (None, dict(color="tab:purple", label="candidate"))):
        group = [(px, py) for i, px, py in pts if candidates[i].get("passed", None) is passed]
        if group:
            ax.scatter(*zip(*group), s=30, alpha=0.8, zorder=2, **style)
    on_front = sorted(((px, py, i) for i, px, py in pts if i in front))
    ax.plot([p[0] for p in on_front], [p[1] for p in on_front], "--", color="tab:orange", lw=1.5, zorder=3)
    ax.scatter([p[0] for p in on_front], [p[1] for p in on_front], s=110, facecolors="none",
               edgecolors="tab:orange", linewidths=2, zorder=4, label=f"Pareto front ({len(on_front)})")
    for px, py, i in on_front:
        label = str(candidates[i].get("label", i))
        ax.annotate(label[:40], (px, py), xytext=(6, 6), textcoords="offset points", fontsize=7, color="0.25")
    if current is not None and any(i == current for i, _, _ in pts):
        c = candidates[current]
        ax.scatter([c[x]], [c[y]], marker="*", s=260, color="tab:red", edgecolors="black", zorder=5,
                   label="this run")
    if baseline is not None and _num(baseline.get(x)) is not None and _num(baseline.get(y)) is not None:
        ax.scatter([baseline[x]], [baseline[y]], marker="D", s=70, color="black", zorder=5, label="base model")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.set_title(title or f"{y} vs {x}: {len(pts)} candidates")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_ppl_vs_size(candidates, path, current=None, baseline=None) -> Path | None:
    return plot_tradeoff(candidates, path, "size_mb", current=current, baseline=baseline,
                         title="Perplexity vs size")


def plot_ppl_vs_speed(candidates, path, current=None, baseline=None) -> Path | None:
    return plot_tradeoff(candidates, path, "decode_tps", maximize_x=True, current=current, baseline=baseline,
                         title="Perplexity vs decode speed")


def layer_errors(layers: Mapping[str, Mapping]) -> tuple[str, dict[str, float]] | None:
    """(error key, {linear: error}) from one stage's per-linear stats, for the first key of
    ERROR_KEYS that some linear holds; None when none does."""
    for key in ERROR_KEYS:
        values = {name: _num(st.get(key)) for name, st in layers.items() if isinstance(st, Mapping)}
        values = {name: v for name, v in values.items() if v is not None}
        if values:
            return key, values
    return None


def _layer_index(name: str) -> int | None:
    m = re.search(r"(?:^|\.)(\d+)\.", name)
    return int(m.group(1)) if m else None


def plot_layer_errors(stages: Sequence[Mapping], path: str | Path) -> Path | None:
    """Per-linear reconstruction error of each stage that records one: stages are dicts with
    `name` and `layers` ({linear: {error key: value, ...}}, as in a stage's stats.json). One
    line per stage over the linears in decoder order; log scale when errors span > 50x."""
    series = []
    for st in stages:
        found = layer_errors(st.get("layers") or {})
        if found:
            series.append((str(st.get("name", len(series))), *found))
    if not series:
        return None
    order: list[str] = []
    for _, _, values in series:
        order += [n for n in values if n not in order]
    position = {n: p for p, n in enumerate(sorted(order, key=lambda n: (_layer_index(n) or 0, order.index(n))))}
    fig = _figure()
    ax = fig.add_subplot()
    every = []
    for name, key, values in series:
        xs = sorted(position[n] for n in values)
        by_pos = {position[n]: v for n, v in values.items()}
        ax.plot(xs, [by_pos[p] for p in xs], marker=".", ms=4, lw=1, label=f"{name} ({key})")
        every += list(values.values())
    positive = [v for v in every if v > 0]
    if positive and len(positive) == len(every) and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
    ticks = {}
    for n, p in position.items():
        layer = _layer_index(n)
        if layer is not None and (layer not in ticks or p < ticks[layer]):
            ticks[layer] = p
    if ticks:
        step = max(1, math.ceil(len(ticks) / 16))
        shown = sorted(ticks.items())[::step]
        ax.set_xticks([p for _, p in shown], [str(layer) for layer, _ in shown])
    ax.set_xlabel("decoder layer (linears within a layer in order)")
    ax.set_ylabel("relative reconstruction error")
    ax.set_title("Per-layer reconstruction error by stage")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_training(history: Mapping[str, Sequence[tuple[int, float]]], path: str | Path,
                  title: str = "Distillation training") -> Path | None:
    """Loss (and its parts) per step on the left axis, learning rate on the right.
    `history`: {metric: [(step, value), ...]}, e.g. from MLflow metric histories; `loss`
    is required, `lr` optional, grad_norm is left out. None when there is no loss."""
    def points(name):
        pts = sorted((int(s), _num(v)) for s, v in history.get(name, ()) if _num(v) is not None)
        return [p[0] for p in pts], [p[1] for p in pts]

    steps, loss = points("loss")
    if not steps:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(steps, loss, marker="." if len(steps) < 50 else None, color="tab:blue", lw=1.5, label="loss")
    colors = iter(["tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 4)
    for name in sorted(set(history) - {"loss", "lr", "grad_norm"}):
        xs, ys = points(name)
        if xs:
            ax.plot(xs, ys, lw=1, ls="--", alpha=0.8, color=next(colors), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    xs, lr = points("lr")
    if xs:
        ax2 = ax.twinx()
        ax2.plot(xs, lr, color="tab:green", lw=1, alpha=0.7, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    ax.set_title(title)
    return _save(fig, path)


def plot_trend(series: Mapping, metric: str, path: str | Path, title: str | None = None) -> Path | None:
    """One metric over the last nights as an SVG (frugalflow/trends.py `series`): each night's candidate
    (green: passed, red: failed its gates) and the champion after each night as a step line, every point
    a link to its run (`url`). None when neither has a value."""
    nights, champion = list(series.get("nights", ())), list(series.get("champion", ()))
    if not nights and not champion:
        return None
    fig = Figure(figsize=(8.0, 3.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    if champion:
        xs, ys = [p[0] for p in champion], [p[1] for p in champion]
        ax.step(xs, ys, where="post", color="tab:blue", lw=1.2, alpha=0.6)
        dots = ax.scatter(xs, ys, s=22, marker="s", color="tab:blue", zorder=3, label="champion after the night")
        dots.set_urls([p[2] for p in champion])
    for verdict, color, name in (("pass", "tab:green", "candidate: passed"), ("fail", "tab:red", "candidate: failed")):
        pts = [p for p in nights if p[3] == verdict]
        if pts:
            dots = ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30, color=color, zorder=4, label=name)
            dots.set_urls([p[2] for p in pts])
    ticks = list(series.get("ticks", ()))
    every = max(1, len(ticks) // 12)
    ax.set_xticks([t[0] for t in ticks[::every]], [t[1] for t in ticks[::every]], fontsize=8)
    ax.set_xlim(-0.5, max(len(ticks), 1) - 0.5)
    ax.set_ylabel(metric)
    ax.set_title(title or metric, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": metric}):  # text as text; ids unique per metric
        fig.savefig(path, format="svg")
    return path
