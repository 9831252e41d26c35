"""Logs as a user reads them: the start-up noise of our dependencies is filtered, other warnings show, and a training log written to a file has readable progress lines."""

from pathlib import Path
import io
import subprocess
import sys
import time
import pytest
from qat.progress import progress_bar

ROOT = Path(__file__).resolve().parents[2]

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


def probe(first: str, *, env) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, first], cwd=ROOT, env=env(), capture_output=True,
                          text=True, check=True).stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the noise is that of CPU-only hosts")
def test_torchao_startup_noise_is_filtered_and_other_warnings_show(env):
    import importlib.util

    bare = probe("bare", env=env)  # the stack as it is: the noise is there (if this fails, drop the filter)
    # torchao says "Detected no triton" only where triton is missing (the test install has it)
    expected = [n for n in NOISE if n != "Detected no triton" or importlib.util.find_spec("triton") is None]
    assert all(n in bare for n in expected), bare
    err = probe("qat", env=env)
    assert not any(n in l for l in err.splitlines()
                   for n in ("_C_mxfp8", "_C_cutlass", "<enum 'Kernel", "Detected no triton")), err
    assert "another torchao warning" in err
    assert "_C_other.so: a library of ours would show" in err
    assert "<enum 'Mine'> is an Enum subclass" in err


def test_training_log_into_a_file_has_progress_lines_and_no_noise(world, tmp_path, base_overrides, env, train_cmd):
    """The real entry point with its output going to a pipe, as under Slurm or CI."""
    args = [a for a in base_overrides(world, tmp_path) if a != "logging.progress_bar=false"]
    # a cache of its own: datasets loads and maps (tokenizes) the files, and draws its bars
    proc = subprocess.run(train_cmd(args + ["logging.progress_bar=true"]), cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**env(), "QAT_PROGRESS_EVERY_S": "3600", "QAT_DATA_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr
    # the libraries' bars too (qat.progress.plain_library_bars): transformers loading weights,
    # datasets generating a split (one per source file: two) and mapping; each bar a first and a
    # final line, nothing between (QAT_PROGRESS_EVERY_S=3600)
    for desc, final, bars in (("Loading weights", "100%|", 1), ("Generating train split", "examples/s]", 2),
                              ("tokenize data.sources[0]", "100%|", 1)):
        lines = [l for l in proc.stderr.splitlines() if l.startswith(desc + ":")]
        assert len(lines) == 2 * bars, (desc, proc.stderr)
        assert all("?" in a and final in b for a, b in zip(lines[::2], lines[1::2])), lines
    bar = [l for l in proc.stderr.splitlines() if l.startswith("train:")]
    assert [l.split("|")[0] for l in bar] == ["train:   0%", "train: 100%"], proc.stderr
    assert "6/6" in bar[-1]
    assert not [l for l in proc.stderr.splitlines() if any(n in l for n in NOISE)], proc.stderr
