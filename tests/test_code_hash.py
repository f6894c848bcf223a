"""Cache keys hash the code that runs (frugalflow/code_hash.py), tested both ways on a copy of the
library: an edit the computation does not run reuses (same key), an edit of code it runs, even a
module reached only through an import inside a function, recomputes (new key). The stage key of
tasks/compress.py and the evaluation key of frugalflow/evaluate/suite.py are built from it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from frugalflow import code_hash as H


@pytest.fixture
def library(tmp_path) -> Path:
    copy = tmp_path / "frugalflow"
    shutil.copytree(H.ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited\n")
    H._hash.cache_clear()  # a process hashes the code once: here the code changes under the process


def keys(root: Path) -> dict[str, str]:
    return {"magnitude": H.code_hash("frugalflow.prune.magnitude", "frugalflow.stages", root=root),
            "gptq": H.code_hash("frugalflow.quant.gptq", "frugalflow.stages", root=root),
            "evaluation": H.code_hash("frugalflow.evaluate.suite", root=root)}


def test_an_edit_recomputes_only_what_runs_the_edited_code(library):
    before = keys(library)
    assert len(set(before.values())) == 3
    edit(library / "export" / "gguf.py")  # exporting: no stage and no evaluation runs it
    assert keys(library) == before
    edit(library / "prune" / "magnitude.py")
    after = keys(library)
    assert after["magnitude"] != before["magnitude"]
    assert after["gptq"] == before["gptq"] and after["evaluation"] == before["evaluation"]
    edit(library / "evaluate" / "perplexity.py")
    assert keys(library)["evaluation"] != after["evaluation"]
    edit(library / "quant" / "gptq.py")
    assert keys(library)["gptq"] != after["gptq"]


def test_imports_inside_functions_and_packages_count(library):
    used = H.modules_used("frugalflow.quant.gptq", root=library)
    assert {"frugalflow", "frugalflow.quant", "frugalflow.quant.gptq"} <= set(used)
    assert "frugalflow.export.gguf" not in used
    # a module imported only inside a function body is part of the code that runs
    (library / "quant" / "extra_helper.py").write_text("X = 1\n")
    gptq = library / "quant" / "gptq.py"
    gptq.write_text(gptq.read_text() + "\n\ndef _uses_helper():\n    from frugalflow.quant import extra_helper\n"
                    "    return extra_helper.X\n")
    H._hash.cache_clear()
    assert "frugalflow.quant.extra_helper" in H.modules_used("frugalflow.quant.gptq", root=library)
    before = H.code_hash("frugalflow.quant.gptq", root=library)
    edit(library / "quant" / "extra_helper.py")
    assert H.code_hash("frugalflow.quant.gptq", root=library) != before


def test_stage_and_evaluation_keys_use_it():
    from frugalflow.config import Recipe
    from tasks.compress import method_code_hash

    stage = Recipe.model_validate({"stages": [{"method": "magnitude", "sparsity": 0.5}]}).stages[0]
    assert method_code_hash(stage) == H.code_hash("frugalflow.prune.magnitude", "frugalflow.stages")
    import inspect

    from frugalflow.evaluate import suite

    assert "code_hash(__name__)" in inspect.getsource(suite.evaluation_key)
