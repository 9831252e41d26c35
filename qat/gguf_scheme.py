"""The GGUF scheme family (q4_0, q8_0): llama.cpp's block formats, registered in qat/schemes.py.

Weights: the format's blocks of 32 along the input dimension with an fp16 scale each, exactly the
codes the `gguf` package's reference quantizer writes (qat/gguf_quant.py). Activations: Q8_0 per
block of 32, what llama.cpp's CPU backend quantizes a Q4_0 or Q8_0 matmul's input to. torchao has
no kernels for these formats: convert's quantized model is simulated (labelled), and the real
artifact is the .gguf file (convert --gguf), which llama.cpp runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from qat.errors import UserError
from qat.gguf_quant import BLOCK, GGUFActivationQ8, GGUFWeight
from qat.scheme_base import Scheme, check_blocks_divide


@dataclass(frozen=True)
class GGUFScheme(Scheme):
    """GGUF `fmt` ("q4_0" or "q8_0") weights and Q8_0 activations, blocks of 32."""

    fmt: str = "q4_0"
    family: ClassVar[str] = "gguf"
    torchao_qat: ClassVar[bool] = False
    torchao_kernels: ClassVar[bool] = False
    gguf_format: ClassVar[bool] = True

    def base_config(self, group_size):
        raise UserError(f"scheme {self.name!r} is a GGUF format with no torchao kernels; convert writes its "
                        f"simulated model and, with --gguf, the .gguf file llama.cpp runs")

    def fake_quantizers(self, group_size):
        return GGUFWeight(self.fmt), GGUFActivationQ8()

    def check_shapes(self, targets, group_size):
        check_blocks_divide(self.name, targets, BLOCK, " (GGUF blocks)")

    @property
    def hardware(self) -> str:
        return "llama.cpp (the .gguf file); no torchao kernels"

    @property
    def convert_path(self) -> str:
        return "simulated (labelled); with --gguf, a .gguf holding the trained codes, which llama.cpp runs"

    def missing_kernels(self, device, capability=None, mslk=None):
        return f"scheme {self.name!r} has no torchao kernels (its real form is the .gguf file: convert --gguf)"

    def describe(self, group_size: Optional[int]) -> str:
        weights = {"q4_0": "4-bit", "q8_0": "8-bit"}[self.fmt]
        return f"{self.name} (GGUF {self.fmt.upper()}: {weights} weights + Q8_0 activations, blocks of 32)"
