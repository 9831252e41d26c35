"""The one place that maps a scheme name to torchao configs.

Training (QAT prepare), convert (QAT convert) and PTQ all resolve a scheme through `get_scheme`,
so prepare and convert cannot disagree. A checkpoint records `Scheme.record(group_size, ...)`
and convert rebuilds the scheme from that record.

Names:
  8da{b}w             int8 dynamic per-token activations + int{b} weights, b in 2..8 (8da4w)
  int{b}-weight-only  int{b} weights only (intx, runs on CPU and GPU), b in 2..8
  float8              float8 rowwise dynamic activations + weights
  nvfp4               NVFP4 activations + weights (E2M1, E4M3 scales per 16, per-tensor scale)
  mxfp4               MXFP4 activations + weights (E2M1, E8M0 scales per 32)
QAT trains every scheme on any hardware with our fake quantizers (qat/fake_quant.py); real
quantized kernels (convert, and torchao's own fake quantizers) need the `hardware` listed.
Weights are symmetric, per group of `group_size` input features, or per output channel when
`group_size` is null.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional

import torch

from qat.errors import UserError


@dataclass(frozen=True)
class Scheme:
    name: str
    family: str  # "intx", "float8" or "nvfp4"
    weight_bits: Optional[int] = None
    int8_activations: bool = False
    min_capability: Optional[tuple[int, int]] = None  # CUDA compute capability needed
    hardware: str = "any CPU or GPU"

    @property
    def uses_group_size(self) -> bool:
        return self.family == "intx"

    def describe(self, group_size: Optional[int]) -> str:
        if self.family != "intx":
            return self.name
        gran = f"group {group_size}" if group_size else "per channel"
        act = "int8 dynamic activations + " if self.int8_activations else ""
        return f"{self.name} ({act}int{self.weight_bits} weights, {gran})"

    def record(self, group_size: Optional[int], embedding: bool) -> dict:
        """What a checkpoint stores so that convert rebuilds exactly this scheme."""
        return {"scheme": self.name, "group_size": group_size if self.uses_group_size else None,
                "embedding": embedding}

    def check_hardware(self, device: torch.device) -> None:
        """For what needs real kernels: convert, and training with qat.backend=torchao."""
        if self.family == "mxfp4":
            raise UserError("scheme 'mxfp4' has no real-kernel convert here yet; its QAT runs emulated "
                            "(qat.backend=ours) and evaluation must use the simulated model")
        if self.min_capability is None:
            return
        major, minor = self.min_capability
        if device.type != "cuda":
            raise UserError(f"scheme {self.name!r} needs {self.hardware}; this run is on {device.type}")
        cap = torch.cuda.get_device_capability(device)
        if cap < self.min_capability:
            raise UserError(f"scheme {self.name!r} needs {self.hardware} (sm >= {major}.{minor}); "
                            f"{torch.cuda.get_device_name(device)} is sm {cap[0]}.{cap[1]}")

    def base_config(self, group_size: Optional[int]):
        """The torchao PTQ config; QATConfig(base_config, step=...) derives fake quantization from it."""
        from torchao.quantization import PerAxis, PerGroup

        if self.family == "intx":
            bits = getattr(torch, f"int{self.weight_bits}")
            gran = PerGroup(group_size) if group_size else PerAxis(0)
            if self.int8_activations:
                from torchao.quantization import Int8DynamicActivationIntxWeightConfig
                return Int8DynamicActivationIntxWeightConfig(weight_dtype=bits, weight_granularity=gran)
            from torchao.quantization import IntxWeightOnlyConfig
            return IntxWeightOnlyConfig(weight_dtype=bits, granularity=gran)
        if self.family == "float8":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig
        return NVFP4DynamicActivationNVFP4WeightConfig()

    def embedding_config(self, group_size: Optional[int]):
        """Weight-only config for the input embedding (activations of a lookup are not quantized)."""
        if self.family != "intx":
            raise UserError(f"qat.embedding=true is only supported for intx schemes, not {self.name!r}")
        from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup

        gran = PerGroup(group_size) if group_size else PerAxis(0)
        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{self.weight_bits}"), granularity=gran)


def _registry() -> dict[str, Scheme]:
    reg = {}
    for b in range(2, 9):
        reg[f"8da{b}w"] = Scheme(f"8da{b}w", "intx", b, int8_activations=True)
        reg[f"int{b}-weight-only"] = Scheme(f"int{b}-weight-only", "intx", b)
    reg["float8"] = Scheme("float8", "float8", min_capability=(8, 9),
                           hardware="a CUDA GPU with float8 support (Ada, Hopper or newer)")
    reg["nvfp4"] = Scheme("nvfp4", "nvfp4", min_capability=(10, 0),
                          hardware="a Blackwell CUDA GPU")
    reg["mxfp4"] = Scheme("mxfp4", "mxfp4", min_capability=(10, 0), hardware="a Blackwell CUDA GPU")
    return reg


SCHEMES = _registry()


def get_scheme(name: str) -> Scheme:
    if name in SCHEMES:
        return SCHEMES[name]
    close = difflib.get_close_matches(name, SCHEMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown QAT scheme {name!r}.{hint} Known: {', '.join(SCHEMES)}")


def check_group_size(model: torch.nn.Module, targets: dict[str, torch.nn.Module], group_size: Optional[int]) -> None:
    """Every targeted layer's reduction dimension must split into whole groups."""
    if not group_size:
        return
    for fqn, mod in targets.items():
        dim = mod.in_features if isinstance(mod, torch.nn.Linear) else mod.embedding_dim
        if dim % group_size:
            raise UserError(f"qat.group_size={group_size} does not divide in_features={dim} of layer "
                            f"{fqn}; pick a divisor of {dim} or null for per-channel")
