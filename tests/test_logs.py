"""Readable logs: plain progress lines when output is not a terminal; torchao's start-up noise
filtered, every other warning kept."""

import io
import subprocess
import sys
import time

import pytest

from conftest import ROOT, base_overrides, env, train_cmd
from qat.progress import progress_bar


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
    lines = drive(every_s=0).splitlines()
    assert len(lines) > 20 and all("\r" not in l for l in lines)
    assert [l for l in lines if "20/20" in l][-1].endswith("loss=0.0500]")


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


NOISE = ("Failed to load", "_C_mxfp8", "is an Enum subclass", "Detected no triton")
PROBE = """
import logging, sys
logging.basicConfig()  # as pytest and lm-eval do: records behind a NullHandler show too
if sys.argv[1] == "qat":
    import qat
import torch, torchao
logging.getLogger("torchao.quantization").warning("another torchao warning")
logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_other.so: a library of ours would show")
import enum
class Mine(str, enum.Enum):
    A = "a"
torch.utils._pytree.register_constant(Mine)
"""


def probe(first: str) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, first], cwd=ROOT, env=env(), capture_output=True,
                          text=True, check=True).stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the noise is that of CPU-only hosts")
def test_torchao_startup_noise_is_filtered_and_other_warnings_show():
    bare = probe("bare")  # the stack as it is: the noise is there (if this fails, drop the filter)
    assert all(n in bare for n in NOISE), bare
    err = probe("qat")
    assert not any(n in l for l in err.splitlines()
                   for n in ("_C_mxfp8", "_C_cutlass", "<enum 'Kernel", "Detected no triton")), err
    assert "another torchao warning" in err
    assert "_C_other.so: a library of ours would show" in err
    assert "<enum 'Mine'> is an Enum subclass" in err


def test_training_log_into_a_file_has_progress_lines_and_no_noise(world, tmp_path):
    """The real entry point with its output going to a pipe, as under Slurm or CI."""
    args = [a for a in base_overrides(world, tmp_path) if a != "logging.progress_bar=false"]
    # a cache of its own: datasets loads and maps (tokenizes) the files, and draws its bars
    proc = subprocess.run(train_cmd(args + ["logging.progress_bar=true"]), cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**env(), "QAT_PROGRESS_EVERY_S": "3600", "QAT_DATA_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr
    # the libraries' bars too (qat.progress.plain_library_bars): transformers loading weights,
    # datasets generating a split and mapping; each a first and a final line
    for desc, final in (("Loading weights", "100%|"), ("Generating train split", "examples/s]"),
                        ("tokenize data.sources[0]", "100%|")):
        lines = [l for l in proc.stderr.splitlines() if l.startswith(desc + ":")]
        assert len(lines) >= 2 and final in lines[-1] and "?" in lines[0], (desc, proc.stderr)
    bar = [l for l in proc.stderr.splitlines() if l.startswith("train:")]
    assert [l.split("|")[0] for l in bar] == ["train:   0%", "train: 100%"], proc.stderr
    assert "6/6" in bar[-1]
    assert not [l for l in proc.stderr.splitlines() if any(n in l for n in NOISE)], proc.stderr
