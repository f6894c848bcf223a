"""The evaluation report of one run, as a JSON-able dict and as markdown."""
from __future__ import annotations

ROWS = (("ppl", "perplexity", "{:.3f}"), ("size_mb", "size on disk (MB)", "{:.1f}"),
        ("decode_tps", "decode tokens/s", "{:.1f}"), ("prefill_ms", "prefill latency (ms)", "{:.1f}"),
        ("peak_mem_mb", "peak memory (MB)", "{:.0f}"), ("sparsity", "sparsity", "{:.3f}"),
        ("bits_per_weight", "bits per weight", "{:.2f}"))


def build_report(recipe_name: str, baseline: dict, candidate: dict, stages: list[dict], verdict: dict,
                 lineage: dict) -> dict:
    return {"recipe": recipe_name, "baseline": baseline, "candidate": candidate, "stages": stages,
            "verdict": verdict, "lineage": lineage}


def _fmt(fmt: str, value) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def to_markdown(report: dict) -> str:
    base, cand, verdict = report["baseline"], report["candidate"], report["verdict"]
    lines = [f"# frugalflow run: {report['recipe']}", "",
             f"**Verdict: {'PASS' if verdict['passed'] else 'FAIL'}**", "",
             "| metric | base model | candidate | ratio |", "|---|---|---|---|"]
    for key, label, fmt in ROWS:
        b, c = base.get(key), cand.get(key)
        ratio = f"{c / b:.3f}" if isinstance(b, (int, float)) and isinstance(c, (int, float)) and b else "-"
        lines.append(f"| {label} | {_fmt(fmt, b)} | {_fmt(fmt, c)} | {ratio} |")
    lines += ["", "## Gates", "", "| gate | value | rule | threshold | result |", "|---|---|---|---|---|"]
    for g in verdict["gates"]:
        lines.append(f"| {g['name']} | {g['value']:.4g} | {g['rule']} | {g['threshold']} | "
                     f"{'pass' if g['passed'] else 'FAIL'} |")
    lines += ["", "## Stages", "", "| # | method | seconds | sparsity | bits/weight | cached |", "|---|---|---|---|---|---|"]
    for i, s in enumerate(report["stages"]):
        st = s.get("stats", {})
        lines.append(f"| {i} | {s['method']} | {_fmt('{:.1f}', st.get('seconds'))} | "
                     f"{_fmt('{:.3f}', st.get('sparsity'))} | {_fmt('{:.2f}', st.get('bits_per_weight'))} | "
                     f"{s.get('cached', False)} |")
    lin = report["lineage"]
    lines += ["", "## Lineage", "", f"- git commit: `{lin.get('git_commit')}`"
              f"{' (uncommitted changes)' if lin.get('git_dirty') else ''}"]
    lines += [f"- `{path}`: md5 `{md5}`" for path, md5 in sorted(lin.get("dvc", {}).items())]
    return "\n".join(lines) + "\n"
