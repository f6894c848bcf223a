"""`frugalflow.progress`: a bar is drawn on a terminal and nothing is written to a log stream."""
import io

import torch

from frugalflow.evaluate.perplexity import perplexity
from frugalflow.progress import ProgressBar, shown


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_counts_the_evaluation_windows(tiny_model):
    stream = Tty()
    assert shown(stream)
    windows = torch.randint(0, tiny_model.config.vocab_size, (3, 8))
    with ProgressBar("evaluate: windows", stream=stream) as bar:
        perplexity(tiny_model, windows, on_progress=bar)
    text = stream.getvalue()
    assert "evaluate: windows" in text and "3/3" in text


def test_nothing_written_where_stderr_is_a_log(monkeypatch):
    log = io.StringIO()
    assert not shown(log)
    bar = ProgressBar("layers", stream=log)
    for i in range(1, 5):
        bar(i, 4)
    assert log.getvalue() == ""
    monkeypatch.setenv("FRUGALFLOW_PROGRESS", "off")
    assert not shown(Tty())


def test_a_stage_reports_its_layers_and_its_distillation_steps(tmp_path, tiny_model_dir, tiny_data_dir):
    """run_stage's `progress` gets (finished layers, layers) from a calibrated method and (step, steps)
    from distillation; the report lines count the same way."""
    from helpers import stage_config

    from frugalflow.stages import run_stage

    seen, lines = [], []
    run_stage(stage_config("wanda", sparsity=0.5), tiny_model_dir, tmp_path / "wanda", data_dir=tiny_data_dir,
              teacher_dir=tiny_model_dir, progress=lambda done, total: seen.append((done, total)),
              report=lambda message, metrics: lines.append(message))
    assert seen == [(1, 2), (2, 2)]  # the tiny Llama has 2 decoder layers
    assert [m for m in lines if "layer" in m] == ["wanda: layer 1/2", "wanda: layer 2/2"]
    seen.clear()
    run_stage(stage_config("kl", steps=3, batch_size=2, seq_len=32), tiny_model_dir, tmp_path / "kl",
              data_dir=tiny_data_dir, teacher_dir=tiny_model_dir, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
