"""The evaluation report of one run: a JSON-able dict, rendered as markdown (plots linked
under `plots/`), as one self-contained HTML file (plots inlined, from a Jinja2 template) and as a short summary.

The report dict holds recipe, baseline, candidate, stages, verdict, lineage and, when the
experiment's other runs are known, `candidates`: dicts with `run_id`, `label`, `ppl`,
`size_mb`, `decode_tps`, `passed` and `current` (True for this run). Perplexity sets
(`ppl` and each `ppl.<set>`) are shown side by side, the worst set (which the gate judged)
marked; the base model's decode speed is the one raced in the candidate's evaluation when
there is one (`base_decode_tps`). With `trends` (tasks/trends.py: the last nights and the champion's
moves) it adds their tables (frugalflow/trends.py) and the trend plots, SVGs inlined in the HTML so each
point links to its run. A cell that links is a dict {"text", "href"}.
"""
from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path

import jinja2

from frugalflow.pareto import pareto_front
from frugalflow.trends import label as trend_label
from frugalflow.trends import moves_section, nights_section

ROWS = (("ppl", "perplexity", "{:.3f}"), ("size_mb", "size on disk (MB)", "{:.1f}"),
        ("decode_tps", "decode tokens/s", "{:.1f}"), ("prefill_ms", "prefill latency (ms)", "{:.1f}"),
        ("peak_mem_mb", "peak memory (MB)", "{:.0f}"), ("sparsity", "sparsity", "{:.3f}"),
        ("bits_per_weight", "bits per weight", "{:.2f}"))
CAPTIONS = {"ppl_vs_size": "Perplexity vs size: the experiment's candidates, Pareto front marked",
            "ppl_vs_speed": "Perplexity vs decode speed: the experiment's candidates, Pareto front marked",
            "layer_errors": "Per-layer reconstruction error by stage",
            "training": "Distillation training loss and learning rate per step",
            "trend": "over the last nights: each night's candidate and the champion after it (points link to runs)"}
FRONTS = {"size": (("ppl", "size_mb"), ()), "speed": (("ppl",), ("decode_tps",))}  # (minimize, maximize)
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:left}th{background:#f3f3f3}tr.current td{background:#fff4d6;font-weight:600}
.pass{color:#17803d;font-weight:700}.fail{color:#b3261e;font-weight:700}figure{margin:1em 0}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}code{font-size:.9em}"""


def build_report(recipe_name: str, baseline: dict, candidate: dict, stages: list[dict], verdict: dict,
                 lineage: dict, candidates: list[dict] | None = None, trends: dict | None = None) -> dict:
    report = {"recipe": recipe_name, "baseline": baseline, "candidate": candidate, "stages": stages,
              "verdict": verdict, "lineage": lineage}
    if candidates is not None:
        report["candidates"] = candidates
    if trends:
        report["trends"] = trends
    return report


def _fmt(fmt: str, value) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def fronts(candidates: list[dict]) -> dict[str, set[int]]:
    """{"size": indices on the ppl/size front, "speed": on the ppl/decode_tps front}."""
    return {name: set(pareto_front(candidates, minimize=mn, maximize=mx)) for name, (mn, mx) in FRONTS.items()}


# --------------------------------------------------------------------------- sections
# A section is (title, headers, rows); a row is a list of cell strings, `current` rows are
# listed in `marked`. Both renderers work from these, so markdown and HTML agree.

def metrics_section(report: dict):
    base, cand = report["baseline"], report["candidate"]
    rows = []
    for key, label, fmt in ROWS:
        b, c = base.get(key), cand.get(key)
        if key == "decode_tps" and isinstance(cand.get("base_decode_tps"), (int, float)):
            b, label = cand["base_decode_tps"], f"{label} (raced in this evaluation)"
        ratio = f"{c / b:.3f}" if isinstance(b, (int, float)) and isinstance(c, (int, float)) and b else "-"
        rows.append([label, _fmt(fmt, b), _fmt(fmt, c), ratio])
    return "Metrics", ["metric", "base model", "candidate", "ratio"], rows


def sets_section(report: dict):
    """Perplexity on every set side by side (base, candidate, change, windows), the set the
    perplexity gate judged marked; None when only the primary set was measured."""
    base, cand = report["baseline"], report["candidate"]
    names = ["ppl", *sorted({k for k in (*base, *cand) if k.startswith("ppl.")})]
    if len(names) == 1:
        return None
    gate = next((g for g in report["verdict"].get("gates", []) if g.get("name") == "ppl_increase_pct"), {})
    worst = gate.get("worst") or gate.get("metric")
    rows, marked = [], []
    for name in names:
        b, c = base.get(name), cand.get(name)
        change = (f"{(c / b - 1) * 100:+.2f}%" if isinstance(b, (int, float)) and isinstance(c, (int, float)) and b
                  else "-")
        windows = cand.get("eval_windows" if name == "ppl" else f"windows.{name[4:]}")
        if name == worst and gate:
            marked.append(len(rows))
        rows.append([("eval (prepared split)" if name == "ppl" else name[4:]) + (" (worst)" if name == worst and gate
                                                                              else ""),
                     _fmt("{:.0f}", windows), _fmt("{:.3f}", b), _fmt("{:.3f}", c), change])
    limit = f" (gate: at most +{gate['threshold']:g}% on each)" if gate else ""
    return f"Perplexity by set{limit}", ["set", "windows", "base model", "candidate", "change"], rows, marked


def _gate_result(gate: dict) -> str:
    """pass / FAIL, or `skipped (why)` for a champion gate with no champion yet."""
    if gate.get("status") == "skipped" or gate.get("passed") is None:
        return f"skipped ({gate['reason']})" if gate.get("reason") else "skipped"
    return "pass" if gate["passed"] else "FAIL"


def gates_section(report: dict):
    rows = [[g["name"] + (f" (worst: {g['worst']})" if g.get("worst") else ""), _fmt("{:.4g}", g["value"]),
             g["rule"], str(g["threshold"]),
             _gate_result(g)] for g in report["verdict"]["gates"]]
    return "Gates", ["gate", "value", "rule", "threshold", "result"], rows


def stages_section(report: dict):
    rows = []
    for i, s in enumerate(report["stages"]):
        st = s.get("stats", {})
        rows.append([str(i), s["method"], _fmt("{:.1f}", st.get("seconds")), _fmt("{:.3f}", st.get("sparsity")),
                     _fmt("{:.2f}", st.get("bits_per_weight")), str(s.get("cached", False))])
    return "Stages", ["#", "method", "seconds", "sparsity", "bits/weight", "cached"], rows


def lineage_section(report: dict):
    lin = report["lineage"]
    commit = f"{lin.get('git_commit')}{' (uncommitted changes)' if lin.get('git_dirty') else ''}"
    rows = [["git commit", commit]] + [[path, f"md5 {md5}"] for path, md5 in sorted(lin.get("dvc", {}).items())]
    return "Lineage", ["input", "version"], rows


def candidates_section(report: dict, front_only: bool = False):
    """The experiment's candidates (best perplexity first), each with the fronts it is on;
    `front_only`: just the front members and this run. None without candidates."""
    cands = report.get("candidates") or []
    if not cands:
        return None
    on = fronts(cands)
    order = sorted(range(len(cands)), key=lambda i: (cands[i].get("ppl") is None, cands[i].get("ppl") or 0.0))
    rows, marked = [], []
    for i in order:
        c = cands[i]
        member = [name for name in FRONTS if i in on[name]]
        if front_only and not member and not c.get("current"):
            continue
        verdict = {True: "pass", False: "FAIL"}.get(c.get("passed"), "-")
        if c.get("current"):
            marked.append(len(rows))
        rows.append([str(c.get("run_id", ""))[:8] + (" (this run)" if c.get("current") else ""),
                     str(c.get("label", "")), _fmt("{:.3f}", c.get("ppl")), _fmt("{:.1f}", c.get("size_mb")),
                     _fmt("{:.1f}", c.get("decode_tps")), verdict, ", ".join(member) or "-"])
    title = f"Pareto front ({len(cands)} candidates)" if front_only else f"Candidates ({len(cands)} runs)"
    return title, ["run", "candidate", "ppl", "size MB", "decode tok/s", "verdict", "Pareto front"], rows, marked


def sections(report: dict) -> list[tuple]:
    by_set = sets_section(report)
    out = [metrics_section(report), *([by_set] if by_set else []), gates_section(report), stages_section(report)]
    cand = candidates_section(report)
    trends = [nights_section(report["trends"]), moves_section(report["trends"])] if report.get("trends") else []
    return out + ([cand] if cand else []) + trends + [lineage_section(report)]


def caption(key: str) -> str:
    """Caption of an image key; `training-2` is the training plot of stage 2."""
    if key in CAPTIONS:
        return CAPTIONS[key]
    base, _, suffix = key.partition("-")
    if base == "trend":
        return f"{trend_label(suffix)} {CAPTIONS['trend']}"
    return f"{CAPTIONS[base]} (stage {suffix})" if base in CAPTIONS else key.replace("_", " ")


def _verdict_line(report: dict) -> tuple[str, list[str]]:
    verdict = report["verdict"]
    return ("PASS" if verdict["passed"] else "FAIL"), list(verdict.get("reasons") or [])


# --------------------------------------------------------------------------- markdown
def _md_cell(cell) -> str:
    text = str(cell["text"] if isinstance(cell, dict) else cell).replace("|", "\\|").replace("\n", " ")
    return f"[{text}]({cell['href']})" if isinstance(cell, dict) else text


def _md_table(section) -> list[str]:
    title, headers, rows = section[:3]
    marked = set(section[3]) if len(section) > 3 else set()
    lines = ["", f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r, row in enumerate(rows):
        cells = [_md_cell(c) for c in row]
        if r in marked:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(report: dict, images: Mapping[str, str | Path] | None = None) -> str:
    """The full report; `images` {key: png path} are linked as `plots/<file name>`."""
    word, reasons = _verdict_line(report)
    lines = [f"# frugalflow run: {report['recipe']}", "", f"**Verdict: {word}**"]
    if reasons:
        lines += [""] + [f"- {r}" for r in reasons]
    for section in sections(report):
        lines += _md_table(section)
    if images:
        lines += ["", "## Plots"]
        for key, path in images.items():
            lines += ["", f"![{caption(key)}](plots/{Path(path).name})", "", f"*{caption(key)}*"]
    return "\n".join(lines) + "\n"


def summary_markdown(report: dict, where: str | None = None) -> str:
    """Short summary for a Prefect artifact: verdict, metrics, gates and the Pareto front."""
    word, reasons = _verdict_line(report)
    lines = [f"# frugalflow: {report['recipe']}", "", f"**Verdict: {word}**" + (f" ({'; '.join(reasons)})"
                                                                               if reasons else "")]
    for section in (metrics_section(report), sets_section(report), gates_section(report),
                    candidates_section(report, front_only=True)):
        if section:
            lines += _md_table(section)
    if where:
        lines += ["", where]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- HTML
_ENV = jinja2.Environment(loader=jinja2.PackageLoader("frugalflow", "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _html_cell(cell) -> dict:
    return {"text": str(cell["text"]), "href": cell["href"]} if isinstance(cell, dict) else {"text": str(cell), "href": None}


def _figure(key: str, path: Path) -> dict:
    """A PNG as base64 data; an SVG inlined as markup (its links stay clickable), from its <svg> element on."""
    if path.suffix == ".svg":
        text = path.read_text()
        return {"key": key, "caption": caption(key), "svg": text[text.index("<svg"):], "data": ""}
    return {"key": key, "caption": caption(key), "svg": "", "data": base64.b64encode(path.read_bytes()).decode("ascii")}


def to_html(report: dict, images: Mapping[str, str | Path] | None = None) -> str:
    """One self-contained HTML page (templates/report.html.j2): the report's tables and the
    PNGs inlined as base64."""
    word, reasons = _verdict_line(report)
    tables = [{"title": sec[0], "headers": sec[1], "rows": [[_html_cell(c) for c in row] for row in sec[2]],
               "marked": set(sec[3]) if len(sec) > 3 else set()} for sec in sections(report)]
    figures = [_figure(key, Path(path)) for key, path in (images or {}).items()]
    return _ENV.get_template("report.html.j2").render(recipe=report["recipe"], css=CSS,
                                                       word=word, reasons=reasons, sections=tables, figures=figures)
