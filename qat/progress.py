"""Progress bars that suit where their output goes; every bar of the recipes comes from here.

On a terminal, a tqdm bar redraws itself in place with carriage returns. Into a file (Slurm's
`--output`, CI logs, `> log`) each redraw is appended, and a long run leaves megabytes of them on
one endless line. So when the bar's stream is not a terminal, `progress_bar` gives tqdm a
`LineWriter`: it turns the redraws into one plain line at most every `every_s` seconds (the first
state, then the latest one each interval, and always the final one), which `tail -f` and grep read.

`every_s` defaults to 30, or the environment variable QAT_PROGRESS_EVERY_S.

The libraries draw bars of their own: datasets (loading a file, `map`), transformers (loading
weights) and lm-eval (its requests). All are tqdm subclasses that call `tqdm.std.tqdm.__init__`,
so `plain_library_bars()` (installed when `qat` is imported) wraps that one method: a bar whose
stream is not a terminal gets a `LineWriter` too. Turning the bars off instead
(`datasets.disable_progress_bars()`, transformers' `logging.disable_progress_bar()`) would hide
the only sign of life of a tokenization or an evaluation that takes an hour.
"""

from __future__ import annotations

import math
import os
import sys
import time


def default_every_s() -> float:
    return float(os.environ.get("QAT_PROGRESS_EVERY_S", 30))


def progress_bar(total: int, desc: str, disable: bool = False, file=None, every_s=None, **kwargs):
    """A tqdm bar on `file` (default stderr): redrawn in place on a terminal, plain lines elsewhere."""
    from tqdm import tqdm

    out = sys.stderr if file is None else file
    if is_terminal(out):
        return tqdm(total=total, desc=desc, disable=disable, file=out, dynamic_ncols=True, **kwargs)
    every_s = default_every_s() if every_s is None else every_s
    return tqdm(total=total, desc=desc, disable=disable, file=LineWriter(out, every_s), ascii=True, **kwargs)


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def plain_library_bars() -> None:
    """Every tqdm bar of the process, ours or a library's, writes plain lines off a terminal."""
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if getattr(init, "_qat_plain_lines", False):
        return

    def __init__(self, *args, **kwargs):
        out = kwargs.get("file") or sys.stderr
        if len(args) < 5 and not isinstance(out, LineWriter) and not is_terminal(out):  # args[4] is file
            kwargs.update(file=LineWriter(out, default_every_s()), ascii=True)
        init(self, *args, **kwargs)

    __init__._qat_plain_lines = True
    tqdm.std.tqdm.__init__ = __init__


class LineWriter:
    """The stream tqdm writes to when the real one is not a terminal.

    tqdm draws a state as '\\r' + text + padding, and ends a bar with '\\n' after its final state.
    We keep the latest state and write it as a line when `every_s` has passed since the last line,
    and at the end of the bar if it has not been written yet.
    """

    def __init__(self, out, every_s: float):
        self.out, self.every_s = out, every_s
        self.pending, self.last_line, self.last_line_t = None, None, -math.inf

    def write(self, s: str) -> int:
        if "\r" in s:
            state = s.rsplit("\r", 1)[1].rstrip()
            if state:  # an empty state is tqdm clearing the line: nothing to say
                self.pending = state
                if time.monotonic() - self.last_line_t >= self.every_s:
                    self._emit()
        elif s == "\n":
            self._emit()
        elif s:
            self.out.write(s)
        return len(s)

    def _emit(self) -> None:
        if self.pending is not None and self.pending != self.last_line:  # close redraws an unchanged bar
            self.out.write(self.pending + "\n")
            self.out.flush()
            self.last_line, self.last_line_t = self.pending, time.monotonic()
        self.pending = None

    def flush(self) -> None:
        self.out.flush()
