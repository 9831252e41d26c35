"""Quantization schemes: the one place that knows what a scheme name means.

Training (QAT prepare), convert (QAT convert), PTQ and the simulated evaluation all resolve a name
through `get_scheme`, and everything they need to know about it is a method of its family class:

    IntxScheme    8da{b}w, int{b}-weight-only   symmetric intN weights per group (or channel),
                                                optionally int8 per-token dynamic activations
    Float8Scheme  float8                        float8 e4m3 rowwise activations and weights
    FP4Scheme     nvfp4, mxfp4                  E2M1 values with per-block scales

A family owns: its torchao base config (PTQ and QAT convert) and embedding config, its weight and
activation fake quantizers (numerics in qat/fake_quant.py), the shape checks that name the layer
that fails, the hardware its real kernels need, whether the converted model must equal the
fake-quantized forward bit for bit, and the record a checkpoint stores. Code outside this module
never compares family names: it asks the scheme.

QAT trains every scheme on any hardware with our fake quantizers; real quantized kernels (convert,
and torchao's own fake quantizers with qat.backend=torchao) need the `hardware` listed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn as nn

from qat.errors import UserError


@dataclass(frozen=True)
class Scheme:
    """Base class of the scheme families; a registered scheme is an instance of one subclass."""

    name: str
    family: ClassVar[str] = ""
    # The converted model must equal the fake-quantized training forward exactly (convert asserts it).
    exact_convert: ClassVar[bool] = False
    # torchao has a QAT prepare path for it (qat.backend=torchao).
    torchao_qat: ClassVar[bool] = True
    uses_group_size: ClassVar[bool] = False

    # --- what each family defines ------------------------------------------------------------
    def base_config(self, group_size: Optional[int]):
        """The torchao PTQ config; QATConfig(base_config, step=...) derives fake quantization from it."""
        raise NotImplementedError(f"{type(self).__name__} defines no base_config")

    def fake_quantizers(self, group_size: Optional[int]):
        """(weight fake quantizer, activation fake quantizer or None) for our QATLinear."""
        raise NotImplementedError(f"{type(self).__name__} defines no fake quantizers")

    def check_shapes(self, targets: dict[str, nn.Module], group_size: Optional[int]) -> None:
        """Raise UserError naming the first targeted layer whose shape the format cannot split."""

    @property
    def hardware(self) -> str:
        return "any CPU or GPU"

    @property
    def convert_path(self) -> str:
        """What convert writes for this scheme, in words (for `qat schemes` and the docs)."""
        return "real quantized weights (torchao)"

    def describe(self, group_size: Optional[int]) -> str:
        return self.name

    # --- shared behaviour ----------------------------------------------------------------------
    def embedding_config(self, group_size: Optional[int]):
        raise UserError(f"qat.embedding=true is only supported for intx schemes, not {self.name!r}")

    def record(self, group_size: Optional[int], embedding: bool) -> dict:
        """What a checkpoint stores so that convert rebuilds exactly this scheme."""
        return {"scheme": self.name, "family": self.family,
                "group_size": group_size if self.uses_group_size else None, "embedding": embedding}

    def missing_kernels(self, device: torch.device) -> Optional[str]:
        """None when `device` runs this scheme's real quantized kernels, else why not (one line)."""
        return None

    def check_hardware(self, device: torch.device) -> None:
        """For what needs real kernels: convert, and training with qat.backend=torchao."""
        why = self.missing_kernels(device)
        if why:
            raise UserError(why)

    def has_kernels(self, device: torch.device) -> bool:
        return self.missing_kernels(device) is None


def _cuda_capability_gap(scheme: Scheme, device: torch.device, need: tuple[int, int], what: str) -> Optional[str]:
    if device.type != "cuda":
        return f"scheme {scheme.name!r} needs {what}; this run is on {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < need:
        return (f"scheme {scheme.name!r} needs {what} (sm >= {need[0]}.{need[1]}); "
                f"{torch.cuda.get_device_name(device)} is sm {cap[0]}.{cap[1]}")
    return None


def _reduction_dim(mod: nn.Module) -> int:
    """The dimension a weight's groups or blocks run along: in_features, or an embedding's width."""
    return mod.in_features if isinstance(mod, nn.Linear) else mod.embedding_dim


@dataclass(frozen=True)
class IntxScheme(Scheme):
    """Symmetric intN weights per group of `group_size` input features (per output channel when
    null), optionally with int8 asymmetric per-token dynamic activations. torchao's intx tensors
    run on CPU and GPU, and the converted model equals the fake-quantized forward bit for bit."""

    bits: int = 4
    int8_activations: bool = False
    family: ClassVar[str] = "intx"
    exact_convert: ClassVar[bool] = True
    uses_group_size: ClassVar[bool] = True

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"intx scheme {self.name!r}: bits={self.bits} is outside 1..8")

    def _granularity(self, group_size: Optional[int]):
        from torchao.quantization import PerAxis, PerGroup

        return PerGroup(group_size) if group_size else PerAxis(0)

    def base_config(self, group_size):
        bits = getattr(torch, f"int{self.bits}")
        if self.int8_activations:
            from torchao.quantization import Int8DynamicActivationIntxWeightConfig
            return Int8DynamicActivationIntxWeightConfig(weight_dtype=bits, weight_granularity=self._granularity(group_size))
        from torchao.quantization import IntxWeightOnlyConfig
        return IntxWeightOnlyConfig(weight_dtype=bits, granularity=self._granularity(group_size))

    def embedding_config(self, group_size):
        """Weight-only: the activations of a lookup are not quantized."""
        from torchao.quantization import IntxWeightOnlyConfig

        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{self.bits}"),
                                    granularity=self._granularity(group_size))

    def fake_quantizers(self, group_size):
        from qat.fake_quant import Int8PerToken, IntxWeight

        return IntxWeight(self.bits, group_size), (Int8PerToken() if self.int8_activations else None)

    def check_shapes(self, targets, group_size):
        if not group_size:
            return
        for fqn, mod in targets.items():
            dim = _reduction_dim(mod)
            if dim % group_size:
                raise UserError(f"qat.group_size={group_size} does not divide in_features={dim} of layer "
                                f"{fqn}; pick a divisor of {dim} or null for per-channel")

    @property
    def convert_path(self) -> str:
        return "real intx weights (CPU and GPU); equals the fake-quantized forward exactly"

    def describe(self, group_size):
        gran = f"group {group_size}" if group_size else "per channel"
        act = "int8 dynamic activations + " if self.int8_activations else ""
        return f"{self.name} ({act}int{self.bits} weights, {gran})"


@dataclass(frozen=True)
class Float8Scheme(Scheme):
    """float8 e4m3 rowwise dynamic activations and weights; real kernels need sm >= 8.9."""

    family: ClassVar[str] = "float8"

    def base_config(self, group_size):
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())

    def fake_quantizers(self, group_size):
        from qat.fake_quant import Float8Rowwise

        return Float8Rowwise(), Float8Rowwise()

    @property
    def hardware(self) -> str:
        return "a CUDA GPU with float8 support (Ada, Hopper or newer)"

    def describe(self, group_size):
        return f"{self.name} (float8 e4m3 rowwise activations + weights)"

    @property
    def convert_path(self) -> str:
        return "real float8 kernels on sm >= 8.9; elsewhere simulated (fake-quantized forward, labelled)"

    def missing_kernels(self, device):
        return _cuda_capability_gap(self, device, (8, 9), self.hardware)


FP4_BLOCK = {"nvfp4": 16, "mxfp4": 32}


@dataclass(frozen=True)
class FP4Scheme(Scheme):
    """E2M1 values with a scale per block of input features: NVFP4 (E4M3 scales per 16 plus a
    per-tensor scale) or MXFP4 (E8M0 scales per 32). Trained emulated anywhere; torchao's real
    kernels need Blackwell, and MXFP4 has no convert path here yet."""

    kind: str = "nvfp4"
    family: ClassVar[str] = "fp4"

    def __post_init__(self):
        if self.kind not in FP4_BLOCK:
            raise ValueError(f"fp4 scheme {self.name!r}: kind={self.kind!r} is not one of {', '.join(FP4_BLOCK)}")

    @property
    def torchao_qat(self) -> bool:  # type: ignore[override]
        return self.kind == "nvfp4"

    def base_config(self, group_size):
        if self.kind != "nvfp4":
            raise UserError(f"scheme {self.name!r} has no real-kernel convert here yet; evaluate the simulated model")
        from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig

        return NVFP4DynamicActivationNVFP4WeightConfig()

    def fake_quantizers(self, group_size):
        from qat.fake_quant import MXFP4Emulated, NVFP4Emulated

        fq = NVFP4Emulated() if self.kind == "nvfp4" else MXFP4Emulated()
        return fq, fq

    def check_shapes(self, targets, group_size):
        block = FP4_BLOCK[self.kind]
        for fqn, mod in targets.items():
            if _reduction_dim(mod) % block:
                raise UserError(f"scheme {self.name!r} needs in_features divisible by {block}: layer {fqn} has "
                                f"{_reduction_dim(mod)}")

    @property
    def hardware(self) -> str:
        return "a Blackwell CUDA GPU"

    def describe(self, group_size):
        scales = "E4M3 scales per 16 + a per-tensor scale" if self.kind == "nvfp4" else "E8M0 scales per 32"
        return f"{self.name} (E2M1 activations + weights, {scales})"

    @property
    def convert_path(self) -> str:
        if self.kind == "nvfp4":
            return "real NVFP4 kernels on Blackwell; elsewhere simulated (labelled)"
        return "simulated only (fake-quantized forward, labelled)"

    def missing_kernels(self, device):
        if self.kind != "nvfp4":
            return (f"scheme {self.name!r} has no real-kernel convert here yet; its QAT runs emulated "
                    f"(qat.backend=ours) and evaluation must use the simulated model")
        return _cuda_capability_gap(self, device, (10, 0), self.hardware)


def _registry() -> dict[str, Scheme]:
    reg: dict[str, Scheme] = {}
    for b in range(2, 9):
        reg[f"8da{b}w"] = IntxScheme(f"8da{b}w", bits=b, int8_activations=True)
        reg[f"int{b}-weight-only"] = IntxScheme(f"int{b}-weight-only", bits=b)
    reg["float8"] = Float8Scheme("float8")
    for kind in FP4_BLOCK:
        reg[kind] = FP4Scheme(kind, kind=kind)
    return reg


SCHEMES = _registry()


def get_scheme(name: str) -> Scheme:
    if name in SCHEMES:
        return SCHEMES[name]
    close = difflib.get_close_matches(name, SCHEMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown QAT scheme {name!r}.{hint} Known: {', '.join(SCHEMES)}")


def scheme_from_record(rec: dict) -> Scheme:
    """The scheme a checkpoint recorded (by name). A record whose family disagrees with the name's,
    or that sets a group size for a scheme without groups, is refused rather than guessed."""
    scheme = get_scheme(rec["scheme"])
    family = rec.get("family", scheme.family)  # records before families were named carry none
    if family != scheme.family:
        raise UserError(f"the checkpoint records scheme {scheme.name!r} as family {family!r}, but it is "
                        f"{scheme.family!r} here; convert it with the version that trained it")
    if rec.get("group_size") is not None and not scheme.uses_group_size:
        raise UserError(f"the checkpoint records group_size={rec['group_size']} for scheme {scheme.name!r}, "
                        f"which has no groups")
    return scheme


def same_record(a: Optional[dict], b: Optional[dict]) -> bool:
    """Two scheme records describe the same training (the family key is implied by the name)."""
    if a is None or b is None:
        return a is b
    keys = ("scheme", "group_size", "embedding")
    return all(a.get(k) == b.get(k) for k in keys)
