"""The simulated quantized model: where this machine lacks a scheme's real kernels (float8 without
sm >= 8.9, nvfp4/mxfp4 without Blackwell, CUDA-only int4 on a CPU), convert exports hf/ plus
simulated.json, and whoever evaluates that export runs hf/ with the scheme's fake quantization on
its decoder Linears and experts. The forward is exactly the QAT training forward, so the numbers
are those the format gives with exact kernels. Every result of such a model is labelled simulated.

One home: the simulated exporter checks this model against the training forward, and evaluation
loads the same model through `load_simulated`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from qat.config import FakeQuantConfig
from qat.errors import UserError, boundary
from qat.model import apply_qat
from qat.schemes import Scheme, get_scheme

SIMULATED_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}


def simulate(model: nn.Module, scheme: Scheme, group_size: Optional[int]) -> nn.Module:
    """Fake-quantize `model` in place with our fake quantizers (any hardware)."""
    # allow_unquantized: what training covered was decided (and recorded) when it ran
    apply_qat(model, FakeQuantConfig(enabled=True, scheme=scheme.name, group_size=group_size, backend="qatlinear",
                                     allow_unquantized=True), scheme)
    return model


def load_simulated(folder: Path, scheme_name: str, group_size: Optional[int], dtype: str = "auto") -> nn.Module:
    """An HF folder (an export's hf/, or any model) with `scheme_name`'s fake quantization, for eval."""
    from transformers import AutoModelForCausalLM

    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"{folder} is not an HF model folder (no config.json)")
    with boundary(f"--model {folder}: its weights do not load", "convert or copy the folder again"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=SIMULATED_DTYPES.get(dtype, "auto"))
    return simulate(model, get_scheme(scheme_name), group_size).eval()
