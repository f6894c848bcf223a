"""`frugalflow runs`: every evaluation set's change against the base side by side."""
from __future__ import annotations

import pytest

from flows.tables import render_table
from tasks.run_table import columns_for, set_changes


def test_each_set_s_change_against_the_base_is_a_column():
    metrics = {"candidate.ppl": 11.0, "baseline.ppl": 10.0, "candidate.ppl.french": 36.0, "baseline.ppl.french": 30.0,
               "candidate.ppl.russian": 21.0, "baseline.ppl.russian": 20.0, "candidate.ppl.legal": 9.0,
               "candidate.size_mb": 100.0}  # legal has no baseline: no column from it
    changes = set_changes(metrics)
    assert list(changes)[0] == "eval %"
    assert changes == pytest.approx({"eval %": 10.0, "french %": 20.0, "russian %": 5.0})
    rows = [{"run": "a1", "ppl": 11.0, **changes}, {"run": "b2", "ppl": 12.0, "eval %": 20.0, "german %": 3.0}]
    columns = columns_for(rows)
    at = columns.index("ppl")
    assert columns[at + 1:at + 5] == ("eval %", "french %", "russian %", "german %")
    lines = render_table(rows, columns).splitlines()
    header = lines[0].split()
    assert header[header.index("ppl") + 1:header.index("ppl") + 3] == ["eval", "%"]
    assert "20.00" in lines[-1] and "3.00" in lines[-1] and "-" in lines[-1]  # b2 has no french


def test_runs_without_sets_keep_the_plain_columns():
    from tasks.run_table import COLUMNS

    assert columns_for([{"run": "a", "ppl": 1.0}]) == COLUMNS
