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
