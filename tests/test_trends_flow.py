"""Trends over the last nights (issue #40 item 5): the real nightly flow on the tiny model, four nights in
one project: a first champion, a new champion on 8-bit weights, an unchanged night, and a night on new
data whose candidate fails its gates. The last night's report shows every night (its run linked, its
verdict, its data version, the champion after it), the champion's moves with their reasons and one SVG
plot per metric whose points link to the runs; the registered model's description lists the same nights
and moves, linked relative to the MLflow UI."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml
from helpers import client_for, git, make_project, run_flow, tiny_recipe

MODEL = "tiny-trends"
SECONDS: dict[str, float] = {}


@pytest.fixture(scope="module")
def nights(prefect_harness, tmp_path_factory, tiny_model_dir):
    project = make_project(tmp_path_factory.mktemp("project"), tiny_recipe(tiny_model_dir, MODEL,
                                                                             evaluation={"decode_race_rounds": 0}))

    def night(name: str, overrides: list[str]) -> dict:
        started = time.monotonic()
        result = run_flow(project, overrides)
        SECONDS[name] = round(time.monotonic() - started, 1)
        return result

    first = night("first", [])
    promoted = night("8-bit champion", ["stages.1.bits=8"])
    unchanged = night("unchanged", ["stages.1.bits=8"])
    params = project / "params.yaml"
    recipe = yaml.safe_load(params.read_text())
    recipe["data"]["eval_windows"] = 5  # other prepared data: a new data version
    params.write_text(yaml.safe_dump(recipe, sort_keys=False))
    git(project, "commit", "-qam", "fewer eval windows")
    failed = night("new data, gates failed", ["stages.1.bits=8", "gates.max_ppl=0.5"])
    print("\nseconds per night: " + ", ".join(f"{k} {v}" for k, v in SECONDS.items()))
    return project, [first, promoted, unchanged, failed]


def artifact(project: Path, run_id: str, path: str, tmp: Path) -> str:
    return Path(client_for(project).download_artifacts(run_id, path, str(tmp))).read_text()


def test_nights_recorded_as_expected(nights):
    _, (first, promoted, unchanged, failed) = nights
    assert first["promotion"]["champion"] and first["promotion"]["version"] == "1"
    assert promoted["promotion"]["champion"] and promoted["promotion"]["version"] == "2"
    assert unchanged["unchanged"]["version"] == "2"
    assert not failed["verdict"]["passed"] and failed["lineage"]["dvc"]["data"] != first["lineage"]["dvc"]["data"]


def test_report_shows_each_night_its_data_and_the_champion_moves(nights, tmp_path):
    project, results = nights
    first, promoted, unchanged, failed = results
    client = client_for(project)
    html = artifact(project, failed["run_id"], "report/report.html", tmp_path)
    experiment = client.get_run(failed["run_id"]).info.experiment_id
    assert "<h2>Last nights (4)</h2>" in html and "<h2>Champion moves</h2>" in html
    for result in results:  # every night's run linked (the local store: frugalflow ui's address)
        assert f'<a href="http://127.0.0.1:5000/#/experiments/{experiment}/runs/{result["run_id"]}">' in html
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", html.split("<h2>Last nights")[1].split("</table>")[0], re.S)
    cells = [c for c in (re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows) if c]  # not the header
    verdicts = [c[2] for c in cells]
    data = [c[3] for c in cells]
    champions = [c[5] for c in cells]
    assert verdicts == ["fail", "unchanged", "pass", "pass"] and champions == ["2", "2", "2", "1"]  # newest first
    assert [c[4] for c in cells] == ["-", "same as 2", "2", "1"]
    new, old = failed["lineage"]["dvc"]["data"], first["lineage"]["dvc"]["data"]
    assert data == [f"{new[:8]} (new)", old[:8], old[:8], old[:8]]
    moves = html.split("<h2>Champion moves</h2>")[1].split("</table>")[0]
    assert "first passing candidate" in moves and "better than champion version 1" in moves
    # one SVG per metric, inlined; every night's point and the champion's links to its run
    svg = artifact(project, failed["run_id"], "report/plots/trend-ppl.svg", tmp_path)
    links = re.findall(r'xlink:href="(http[^"]+)"', svg)
    # the three nights that measured ppl (not the unchanged one) and the champion after each of the four
    runs = [link.rsplit("/", 1)[1] for link in links]
    assert sorted(runs) == sorted([first["run_id"], promoted["run_id"], failed["run_id"],
                                   first["run_id"], promoted["run_id"], promoted["run_id"], promoted["run_id"]])
    assert {a.path for a in client.list_artifacts(failed["run_id"], "report/plots")} >= \
        {"report/plots/trend-ppl.svg", "report/plots/trend-size_mb.svg"}
    assert html.count("<svg") >= 2 and 'id="trend-size_mb"' in html


def test_registered_model_description_lists_every_night_and_move(nights):
    project, results = nights
    client = client_for(project)
    description = client.get_registered_model(MODEL).description
    experiment = client.get_run(results[0]["run_id"]).info.experiment_id
    assert "### Last 4 nights" in description and len(description) <= 5000
    for result in results:  # relative links: they open in whatever MLflow UI shows the description
        assert f"[{result['run_id'][:8]}](#/experiments/{experiment}/runs/{result['run_id']})" in description
    unchanged = next(line for line in description.splitlines() if results[2]["run_id"][:8] in line)
    assert "| unchanged |" in unchanged and "| same as 2 |" in unchanged
    assert "first passing candidate" in description and "better than champion version 1" in description
