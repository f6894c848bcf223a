"""The trends of the last nights without a flow (frugalflow/trends.py, plots.plot_trend, the report's
trends section): series per metric, the champion after each night, data versions, the registered
model's description within MLflow's 5000 characters, SVG points that link to their runs."""
from __future__ import annotations

import re
from datetime import datetime, timezone

from frugalflow import trends as TR
from frugalflow.plots import plot_trend
from frugalflow.report import build_report, to_html, to_markdown


def night(i: int, verdict: str, data: str, champion: str | None, **metrics) -> dict:
    run = f"{i:08d}" + "e" * 24
    return {"run_id": run, "name": f"n{i}", "url": f"http://ui/#/experiments/1/runs/{run}",
            "started": f"2026-12-{i + 1:02d}T02:00:00+00:00", "status": "FINISHED", "verdict": verdict, "data": data,
            "version": None, "metrics": metrics, "champion": champion, "regressed": None}


def trends(n_nights: int = 3) -> dict:
    nights = [night(0, "pass", "a" * 32, "1", ppl=10.0, **{"ppl.german": 20.0}, size_mb=5.0),
              night(1, "fail", "b" * 32, "1", ppl=30.0, size_mb=5.0),
              night(2, "pass", "b" * 32, "2", ppl=9.0, **{"ppl.german": 22.0}, size_mb=9.0)][:n_nights]
    champions = {"1": {"run_id": nights[0]["run_id"], "url": nights[0]["url"], "metrics": nights[0]["metrics"]}}
    if n_nights > 2:
        champions["2"] = {"run_id": nights[2]["run_id"], "url": nights[2]["url"], "metrics": nights[2]["metrics"]}
    moves = [{"version": "1", "previous": None, "at": "2026-12-01T02:10:00+00:00", "by": "flow",
              "reason": "first passing candidate", "url": nights[0]["url"]},
             {"version": "2", "previous": "1", "at": "2026-12-03T02:10:00+00:00", "by": "flow",
              "reason": "ppl 9 better than champion version 1 (10)", "url": champions.get("2", {}).get("url")}]
    return {"experiment_id": "1", "model": "m", "nights": nights, "moves": moves, "champions": champions}


def test_series_follow_each_night_and_the_champion_after_it():
    t = trends()
    assert TR.metrics(t) == ["ppl", "ppl.german", "size_mb"]
    s = TR.series(t, "ppl.german")
    assert [(p[0], p[1], p[3]) for p in s["nights"]] == [(0, 20.0, "pass"), (2, 22.0, "pass")]  # night 1 lacks it
    assert [(p[0], p[1], p[3]) for p in s["champion"]] == [(0, 20.0, "1"), (1, 20.0, "1"), (2, 22.0, "2")]
    assert s["champion"][1][2] == t["nights"][0]["url"]  # the champion's point links to the run that made it


def test_tables_mark_new_data_and_list_moves_newest_first():
    title, headers, rows, _ = TR.nights_section(trends())
    assert title == "Last nights (3)" and headers[3] == "data"
    assert [r[3] for r in rows] == ["bbbbbbbb", "bbbbbbbb (new)", "aaaaaaaa"]  # newest first; night 1 changed data
    assert rows[0][1] == {"text": "00000002", "href": "http://ui/#/experiments/1/runs/00000002" + "e" * 24}
    _, _, moves = TR.moves_section(trends())
    assert [m[1]["text"] for m in moves] == ["2", "1"] and moves[0][4].startswith("ppl 9 better")


def test_description_fits_mlflow_limit_keeping_the_newest():
    t = trends()
    many = [night(i, "pass", f"{i:032x}", "1", ppl=10.0 + i) for i in range(60)]
    big = {**t, "nights": many}
    text = TR.description_markdown(big, 5000)
    assert len(text) <= 5000 and "### Champion moves" in text
    kept = int(re.search(r"### Last (\d+) nights", text).group(1))
    assert 0 < kept < 60 and "[00000059]" in text and f"[{60 - kept:08d}]" in text and f"[{59 - kept:08d}]" not in text
    assert f"[00000059](http://ui/#/experiments/1/runs/00000059{'e' * 24})" in text  # linked
    small = TR.description_markdown(t, 5000)
    assert "### Last 3 nights" in small and "first passing candidate" in small


def test_trend_svg_links_every_point_to_its_run(tmp_path):
    t = trends()
    path = plot_trend(TR.series(t, "ppl"), "ppl", tmp_path / "trend-ppl.svg", title=TR.label("ppl"))
    links = re.findall(r'<a xlink:href="([^"]+)"', path.read_text())
    urls = {n["url"] for n in t["nights"]}
    assert set(links) == urls  # nights 0-2 as candidates, champions 1 (nights 0, 1) and 2 (night 2)
    assert len(links) == 3 + 3
    assert plot_trend({"nights": [], "champion": [], "ticks": []}, "ppl", tmp_path / "none.svg") is None


def test_report_renders_the_trends_with_links(tmp_path):
    t = trends()
    svg = plot_trend(TR.series(t, "ppl"), "ppl", tmp_path / "trend-ppl.svg")
    verdict = {"passed": True, "gates": [], "reasons": []}
    report = build_report("r", {"ppl": 8.0}, {"ppl": 9.0}, [], verdict, {"git_commit": "c", "dvc": {}}, trends=t)
    html = to_html(report, {"trend-ppl": svg})
    assert "<h2>Last nights (3)</h2>" in html and "<h2>Champion moves</h2>" in html
    assert f'<a href="{t["nights"][2]["url"]}">00000002</a>' in html
    assert html.count("<svg") == 1 and f'xlink:href="{t["nights"][1]["url"]}"' in html  # inlined, links kept
    md = to_markdown(report, {"trend-ppl": svg})
    assert f"[00000002]({t['nights'][2]['url']})" in md and "(plots/trend-ppl.svg)" in md


def test_champion_at_follows_moves_in_time():
    from tasks.trends import champion_at

    moves = trends()["moves"]
    at = datetime(2026, 12, 2, tzinfo=timezone.utc)
    assert champion_at(moves, at) == "1" and champion_at(moves, datetime(2026, 12, 4, tzinfo=timezone.utc)) == "2"
    assert champion_at(moves, datetime(2026, 11, 1, tzinfo=timezone.utc)) is None
