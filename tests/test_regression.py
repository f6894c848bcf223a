"""A new champion worse than the one it replaced (frugalflow/regression.py), the recipe's tolerances
(`notify.regression_pct`) and the lines of the `champion_regressed` message (tasks/notify.py)."""
from __future__ import annotations

import pytest

from frugalflow.config import NotifyConfig, RecipeError
from frugalflow.regression import regressions, tolerance

OLD = {"ppl": 10.0, "ppl.german": 20.0, "ppl.fiction": 30.0, "size_mb": 100.0, "decode_speedup": 2.0,
       "decode_tps": 50.0}


def test_each_metric_worse_beyond_its_tolerance_is_named_worst_first():
    new = {"ppl": 9.0, "ppl.german": 21.0, "ppl.fiction": 30.3, "size_mb": 110.0, "decode_speedup": 1.5,
           "decode_tps": 10.0}
    found = regressions(new, OLD, {"ppl": 2.0, "size_mb": 5.0, "decode_speedup": 15.0})
    # german +5% > 2; fiction +1% within; size +10% > 5; speed-up 25% slower > 15; decode_tps has no tolerance
    assert [(r["metric"], r["worse_pct"]) for r in found] == [("decode_speedup", 25.0), ("size_mb", 10.0),
                                                              ("ppl.german", 5.0)]
    assert found[0] == {"metric": "decode_speedup", "old": 2.0, "new": 1.5, "worse_pct": 25.0, "tolerance_pct": 15.0}


def test_a_set_of_its_own_overrides_ppl_and_better_values_never_count():
    assert tolerance("ppl.german", {"ppl": 2.0, "ppl.german": 10.0}) == 10.0
    assert tolerance("ppl.fiction", {"ppl": 2.0}) == 2.0 and tolerance("ppl.fiction", {"size_mb": 1}) is None
    new = {"ppl.german": 21.0, "decode_speedup": 3.0, "size_mb": 50.0}  # german +5% within its own 10%
    assert regressions(new, OLD, {"ppl": 2.0, "ppl.german": 10.0, "size_mb": 0.0, "decode_speedup": 0.0}) == []
    # a metric one side lacks is not compared
    assert regressions({"ppl.russian": 99.0}, OLD, {"ppl": 0.0}) == []


def test_notify_config_defaults_and_refusals():
    config = NotifyConfig()
    assert set(config.events) == {"failed", "gates_failed", "champion_regressed", "crashed"}
    assert config.regression_pct["ppl"] > 0 and "decode_speedup" in config.regression_pct
    for bad, words in (({"nonsense": 1.0}, ["nonsense", "decode_speedup"]), ({"ppl": -1.0}, ["ppl", ">= 0"])):
        with pytest.raises(ValueError) as info:
            NotifyConfig(regression_pct=bad)
        assert all(w in str(info.value) for w in words), str(info.value)


def test_validate_names_a_bad_tolerance(tmp_path):
    from frugalflow.recipe_io import load_recipe

    path = tmp_path / "params.yaml"
    path.write_text("stages: [{method: rtn}]\nnotify: {regression_pct: {latency: 3}}\n")
    with pytest.raises(RecipeError, match="notify.regression_pct"):
        load_recipe(path)


def test_message_lines_name_versions_values_and_data():
    from tasks.notify import message, regression_lines

    replaced = {"version": "3", "previous": "2", "run_id": "new-run", "previous_run_id": "old-run",
                "reason": "ppl 9 better than champion version 2 (10)",
                "regressions": regressions({"size_mb": 110.0, "ppl": 9.0}, OLD, {"size_mb": 5.0}),
                "data": {"previous": "aaaa", "new": "bbbb"}}
    lines = regression_lines(replaced)
    assert lines[0] == "version 3 replaced version 2: size_mb 100 -> 110 (+10.0% worse; tolerance 5%)"
    assert "previous champion: version 2 (run old-run)" in lines and "measured on different data: aaaa then bbbb" in lines
    subject, body = message("champion_regressed", "m", "r", "new-run", None, "flow (id)", lines)
    assert subject == f"frugalflow m: new champion regressed: {lines[0]}"
    assert "promoted for: ppl 9 better than champion version 2 (10)" in body
    same_data = regression_lines({**replaced, "data": {"previous": "aaaa", "new": "aaaa"}})
    assert not any("different data" in line for line in same_data)
