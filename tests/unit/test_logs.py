"""Readable logs: plain progress lines when output is not a terminal; torchao's start-up noise
filtered, every other warning kept."""

from pathlib import Path
import io
import re
import subprocess
import sys
import time

import pytest

from qat.progress import progress_bar

ROOT = Path(__file__).resolve().parents[2]


def drive(every_s: float, steps: int = 20) -> str:
    out = io.StringIO()  # not a terminal
    bar = progress_bar(steps, "unit", file=out, every_s=every_s)
    for i in range(steps):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}")  # a redraw per step, as train.py does
    bar.close()
    return out.getvalue()


def test_bar_into_a_file_writes_plain_lines_at_most_every_interval():
    text = drive(every_s=3600)
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 2, lines  # the first state, then the final one at close
    assert lines[0].startswith("unit:   0%") and lines[1].startswith("unit: 100%")
    assert "20/20" in lines[1] and "loss=0.0500" in lines[1]
    # every_s=0: each redraw is a line of its own, still no carriage return
    # (tqdm may add a line between two redraws of a slow step, so states are checked, not a count)
    lines = drive(every_s=0).splitlines()
    assert all("\r" not in l for l in lines)
    last = {int(re.search(r"\| +(\d+)/20 ", l).group(1)): l for l in lines}
    assert sorted(last) == list(range(21))  # every step's state got a line
    assert all(last[i].endswith(f"loss={1 / i:.4f}]") for i in range(1, 21))


def test_bar_emits_the_latest_state_once_the_interval_passed():
    out = io.StringIO()
    bar = progress_bar(3, "unit", file=out, every_s=0.3)
    bar.update(1)
    time.sleep(0.35)
    bar.update(1)  # more than every_s after the first line: written now, not at close
    assert out.getvalue().splitlines()[-1].startswith("unit:  67%")
    bar.update(1)  # within every_s: held back, then written by close as the final state
    assert out.getvalue().splitlines()[-1].startswith("unit:  67%")
    bar.close()
    assert [l.split("|")[0] for l in out.getvalue().splitlines()] == ["unit:   0%", "unit:  67%", "unit: 100%"]


