"""The qat command: schemes with their hardware and convert path, help, and bad commands."""

from pathlib import Path
import re
import subprocess
import sys
import pytest
import torch
from qat.errors import UserError
from qat.schemes import (SCHEMES, EmbeddingQuant, FP4Scheme, Float8Scheme, Int4Scheme, IntxScheme, Scheme,
                         embedding_from_record, embedding_quant, get_scheme, same_record, scheme_from_record)

ROOT = Path(__file__).resolve().parents[2]


def qat_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "qat.cli", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)


def test_qat_cli_lists_schemes_with_hardware_and_convert_path(env):
    p = qat_cli("schemes", env=env)
    assert p.returncode == 0
    for name, s in SCHEMES.items():
        line = next(l for l in p.stdout.splitlines() if l.startswith(name + " "))
        assert s.hardware in line and s.convert_path in line


def test_qat_cli_help_and_bad_commands(env):
    assert "qat train --nproc 8" in qat_cli("--help", env=env).stdout
    for args, needle in [(["trian"], "error: unknown command 'trian'"), (["train", "--nproc"], "error: --nproc needs"),
                         (["convert", "--checkpoint", "/nonexistent"], "error: /nonexistent is not a checkpoint")]:
        p = qat_cli(*args, env=env)
        assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(needle), (args, p.stderr[-800:])
