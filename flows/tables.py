"""Terminal tables for the CLI (`runs`, `compare`, `sweep`), drawn with rich: a header, a rule of dashes, one line per row;
columns two spaces apart, no borders, never wrapped (so they stay greppable in logs)."""
from __future__ import annotations

import io

from rich import box
from rich.console import Console
from rich.table import Table

from tasks.compare import FIELDS, differing_params
from tasks.run_table import COLUMNS

# top, head, head rule, mid, row, foot rule, foot, bottom: 4 characters each (left, line, divider, right)
PLAIN = box.Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)


def render(headers: list[str], rows: list[list[str]]) -> str:
    """`rows` (lists of cell strings) under `headers`, left-aligned, as plain text."""
    table = Table(box=PLAIN, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), highlight=False,
                  show_header=True)
    for header in headers:
        table.add_column(header, no_wrap=True, overflow="ignore", header_style="", style="")
    for row in rows:
        table.add_row(*row)
    out = io.StringIO()
    Console(file=out, width=100_000, color_system=None, force_terminal=False, soft_wrap=True).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def render_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    if not rows:
        return "no frugalflow runs recorded yet: start one with `frugalflow run`"

    def cell(v) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    return render(list(columns), [[cell(r.get(c)) for c in columns] for r in rows])


def render_compare(rows: list[dict]) -> str:
    """Fields down the side, one column per run (headed by its 8-character id), then the recipe
    keys that differ between the runs."""
    if not rows:
        return "no runs to compare"

    def cell(v) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    table = [[label, *(cell(r.get(key)) for r in rows)] for label, key in FIELDS]
    table += [[key, *(r.get("params", {}).get(key, "-") for r in rows)] for key in differing_params(rows)]
    return render(["", *(r["run"] for r in rows)], table)


def render_sweep(candidates: list[dict]) -> str:
    """One line per sweep candidate (its record): mark (* selected, P on the Pareto front), label,
    ppl, size, decode speed, and pass / fail / the error that stopped it."""
    def num(m: dict | None, key: str, fmt: str) -> str:
        return format(m[key], fmt) if m and key in m else "-"

    rows = [["*" if c["selected"] else "P" if c["pareto"] else "", c["label"], num(c["metrics"], "ppl", ".3f"),
             num(c["metrics"], "size_mb", ".1f"), num(c["metrics"], "decode_tps", ".1f"),
             c["error"] or ("pass" if c["passed"] else "fail")] for c in candidates]
    return render(["", "candidate", "ppl", "size MB", "decode tok/s", "gates"], rows)
