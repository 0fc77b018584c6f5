"""Progress: a live bar on a terminal, a few plain lines (with the loop's figures) in a log file."""

import io
import re

from tqdm import tqdm

from vilbert.progress import PLAIN_LINES, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_a_few_plain_lines_with_the_loops_figures():
    log = io.StringIO()
    bar = progress(range(10), "Epoch 3", stream=log)
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    lines = log.getvalue().splitlines()
    assert len(lines) == PLAIN_LINES == 4 and "\r" not in log.getvalue()
    assert [re.match(r"Epoch 3: (\d+)/10 steps, [\d.]+ steps/s, ETA \d+:\d\d:\d\d, loss=", line).group(1)
            for line in lines] == ["3", "5", "8", "10"]
    assert lines[-1].endswith("ETA 0:00:00, loss=0.1000")  # written after the step it counts


def test_a_terminal_gets_tqdms_bar_in_the_loops_unit_and_a_disabled_one_nothing():
    terminal = Terminal()
    bar = progress(range(3), "x", stream=terminal, unit="images")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2] and "images/s" in terminal.getvalue()
    quiet = io.StringIO()
    assert list(progress(range(3), "x", enabled=False, stream=quiet)) == [0, 1, 2] and quiet.getvalue() == ""
