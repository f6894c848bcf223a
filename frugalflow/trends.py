"""The champion over the last nights, as tables, plot series and the registered model's description.

Input: the trends dict tasks/trends.py reads from MLflow: `nights` (oldest first: run_id, url, started,
verdict, data, version, metrics, champion = the version that was champion after the night), `moves` (the
registry's champion history: version, previous, at, by, reason, url) and `champions` (version -> run_id,
url, metrics). A table cell that links is a dict {"text", "href"}; frugalflow/report.py renders it as a
markdown or HTML link.
"""
from __future__ import annotations

TREND_METRICS = ("ppl", "size_mb", "decode_speedup")  # with every ppl.<set> after ppl
LABELS = {"ppl": "perplexity, eval split", "size_mb": "size on disk, MB", "decode_speedup": "decode speed-up vs base"}


def link(text: str, href: str | None):
    return {"text": text, "href": href} if href else text


def metrics(trends: dict) -> list[str]:
    """The metrics to plot: ppl, each ppl.<set>, size_mb, decode_speedup, those any night or champion has."""
    seen = {k for n in trends.get("nights", []) for k in n["metrics"]}
    seen |= {k for c in trends.get("champions", {}).values() for k in c["metrics"]}
    sets = sorted(k for k in seen if k.startswith("ppl."))
    return [m for m in ("ppl", *sets, "size_mb", "decode_speedup") if m in seen]


def label(metric: str) -> str:
    return LABELS.get(metric) or (f"perplexity, {metric[4:]}" if metric.startswith("ppl.") else metric)


def series(trends: dict, metric: str) -> dict:
    """{"nights": [(index, value, url, verdict)] for nights that measured it, "champion": [(index, value, url,
    version)] for nights after which a champion held it, "ticks": [(index, day)]}."""
    nights, champion, ticks = [], [], []
    for i, night in enumerate(trends.get("nights", [])):
        ticks.append((i, night["started"][5:10]))
        value = night["metrics"].get(metric)
        if isinstance(value, (int, float)):
            nights.append((i, float(value), night["url"], night["verdict"]))
        held = trends.get("champions", {}).get(night.get("champion") or "")
        if held and isinstance(held["metrics"].get(metric), (int, float)):
            champion.append((i, float(held["metrics"][metric]), held["url"], night["champion"]))
    return {"nights": nights, "champion": champion, "ticks": ticks}


def _num(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _data(nights: list[dict], i: int) -> str:
    data = nights[i].get("data")
    if not data:
        return "-"
    changed = i > 0 and nights[i - 1].get("data") not in (None, data)
    return data[:8] + (" (new)" if changed else "")


def nights_section(trends: dict):
    """The last nights, newest first: date, run (linked), verdict, data version, version, champion after, metrics."""
    nights = trends.get("nights", [])
    rows, marked = [], []
    for i in reversed(range(len(nights))):
        n = nights[i]
        m = n["metrics"]
        version = n.get("version") or "-"
        if n["verdict"] == "unchanged":
            version = f"same as {version}"
        if n.get("regressed"):
            marked.append(len(rows))
        rows.append([n["started"][:16].replace("T", " "), link(n["run_id"][:8], n["url"]), n["verdict"],
                     _data(nights, i), version, n.get("champion") or "-", _num(m.get("ppl"), "{:.3f}"),
                     _num(m.get("size_mb"), "{:.1f}"), _num(m.get("decode_speedup"), "{:.2f}x")])
    headers = ["night (UTC)", "run", "verdict", "data", "version", "champion after", "ppl", "size MB", "speed-up"]
    return f"Last nights ({len(nights)})", headers, rows, marked


def moves_section(trends: dict):
    """Every recorded move of `champion`, newest first, with its reason."""
    rows = [[(m.get("at") or "-")[:16].replace("T", " "), link(str(m["version"]), m.get("url")),
             m.get("previous") or "-", m.get("by") or "-", m.get("reason") or "-"]
            for m in reversed(trends.get("moves", []))]
    return "Champion moves", ["at (UTC)", "version", "previous", "by", "reason"], rows


def _md(cell) -> str:
    text = cell["text"] if isinstance(cell, dict) else str(cell)
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"[{text}]({cell['href']})" if isinstance(cell, dict) else text


def _table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(_md(c) for c in row) + " |" for row in rows)]


def description_markdown(trends: dict, limit: int = 5000) -> str:
    """The registered model's description: the last nights and the champion moves, as many of the newest
    rows of each as fit in `limit` characters."""
    _, n_headers, n_rows, _ = nights_section(trends)
    _, m_headers, m_rows = moves_section(trends)
    keep_n, keep_m = len(n_rows), len(m_rows)
    while True:
        lines = ["Compressed models produced by frugalflow (this description is rewritten every night).", "",
                 f"### Last {keep_n} nights", "", *_table(n_headers, n_rows[:keep_n]), "",
                 f"### Champion moves ({keep_m} newest of {len(m_rows)})" if keep_m < len(m_rows) else "### Champion moves",
                 "", *_table(m_headers, m_rows[:keep_m])]
        text = "\n".join(lines) + "\n"
        if len(text) <= limit or (keep_n == 0 and keep_m == 0):
            return text[:limit]
        if keep_n >= keep_m and keep_n > 0:
            keep_n -= 1
        else:
            keep_m -= 1
