"""Terminal tables for the CLI, drawn with rich: a header, a rule of dashes, one line per row;
columns two spaces apart, no borders, never wrapped (so they stay greppable in logs)."""
from __future__ import annotations

import io

from rich import box
from rich.console import Console
from rich.table import Table

# top, head, head rule, mid, row, foot rule, foot, bottom: 4 characters each (left, line, divider, right)
PLAIN = box.Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)


def render(headers: list[str], rows: list[list[str]], first_column_header: bool = True) -> str:
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
