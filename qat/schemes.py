"""Quantization schemes: the one place that knows what a scheme name means.

Training (QAT prepare), convert (QAT convert), PTQ and the simulated evaluation all resolve a name
through `get_scheme`, and everything they need to know about it is a method of its family class:

    IntxScheme    8da{b}w, intx{b}-weight-only  symmetric intN weights per group (or channel),
                                                optionally int8 per-token dynamic activations
    Int4Scheme    int4-weight-only, fp8-int4    torchao's GPU int4: asymmetric per group with float
                                                zero points; optionally float8 activations
    Float8Scheme  float8                        float8 e4m3 rowwise activations and weights
    FP4Scheme     nvfp4, mxfp4                  E2M1 values with per-block scales
    GGUFScheme    q4_0, q8_0                    llama.cpp's GGUF blocks of 32 (qat/gguf_scheme.py)

A family owns: its torchao base config (PTQ and QAT convert), its weight and
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
from qat.gguf_scheme import GGUFScheme
from qat.scheme_base import (EmbeddingQuant, Scheme, _check_groups_divide, _cuda_capability_gap, _reduction_dim,  # noqa: F401
                              check_blocks_divide, embedding_from_record, embedding_quant)
from qat.fake_quant import (Float8Rowwise, Int4AfterFloat8, Int4Asymmetric, Int8PerToken, IntxWeight, MXFP4Emulated,
                            NVFP4Emulated)


@dataclass(frozen=True)
class IntxScheme(Scheme):
    """Symmetric intN weights per group of `group_size` input features (per output channel when
    null), optionally with int8 asymmetric per-token dynamic activations. torchao's intx tensors
    run on CPU and GPU, and the converted model equals the fake-quantized forward bit for bit."""

    bits: int = 4
    int8_activations: bool = False
    family: ClassVar[str] = "intx"
    exact_convert: ClassVar[bool] = True
    cpu_kernels: ClassVar[bool] = True
    uses_group_size: ClassVar[bool] = True
    learnable_scales: ClassVar[bool] = True

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

    @property
    def default_embedding_bits(self) -> int:
        return self.bits

    def fake_quantizers(self, group_size):
        return IntxWeight(self.bits, group_size), (Int8PerToken() if self.int8_activations else None)

    def check_shapes(self, targets, group_size):
        _check_groups_divide(targets, group_size)

    @property
    def expert_weight_bits(self):
        return self.bits

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
        return Float8Rowwise(), Float8Rowwise()

    @property
    def hardware(self) -> str:
        return "a CUDA GPU with float8 support (Ada, Hopper or newer)"

    def describe(self, group_size):
        return f"{self.name} (float8 e4m3 rowwise activations + weights)"

    @property
    def convert_path(self) -> str:
        return "real float8 kernels on sm >= 8.9; elsewhere simulated (fake-quantized forward, labelled)"

    def missing_kernels(self, device, capability=None, mslk=None):
        return _cuda_capability_gap(self, device, (8, 9), self.hardware, capability)


def _has_mslk() -> bool:
    import importlib.util

    return importlib.util.find_spec("mslk") is not None


@dataclass(frozen=True)
class Int4Scheme(Scheme):
    """torchao's GPU int4, the "int4 weight-only" of torchao's QAT table and torchtune's 4w QAT:
    asymmetric uint4 per group with a floating-point zero point (`Int4WeightOnlyConfig`), the format
    vLLM loads from torchao checkpoints. With `fp8_activations`, float8 rowwise dynamic activations
    and int4 weights per group of 128 (`Float8DynamicActivationInt4WeightConfig`, Hopper serving).
    QAT emulates both anywhere; real kernels are CUDA only, so a CPU convert is simulated."""

    fp8_activations: bool = False
    family: ClassVar[str] = "int4"
    uses_group_size: ClassVar[bool] = True
    kernel_dtype: ClassVar[Optional[str]] = "bf16"  # tinygemm and mslk's int4 tensors take bf16 weights only
    GROUP_SIZES: ClassVar[tuple[int, ...]] = (32, 64, 128, 256)  # what the int4 kernels implement

    def base_config(self, group_size):
        if self.fp8_activations:
            from torchao.quantization import Float8DynamicActivationInt4WeightConfig
            return Float8DynamicActivationInt4WeightConfig()
        from torchao.quantization import Int4WeightOnlyConfig
        return Int4WeightOnlyConfig(group_size=group_size)  # "plain": what vLLM repacks after load

    def packing(self) -> str:
        """The int4 packing convert uses on this machine: plain needs the mslk-cuda package; without
        it, PyTorch's own tinygemm packing. Training asks too, so it trains that packing's grid."""
        return "plain" if _has_mslk() else "tile_packed_to_4d"

    def convert_config(self, group_size):
        if self.fp8_activations:
            # plain, not the default preshuffled: torchao's safetensors support saves Int4Tensor but
            # has no Int4PreshuffledTensor, so only plain writes a quantized/ folder that reloads
            from torchao.quantization import Float8DynamicActivationInt4WeightConfig
            return Float8DynamicActivationInt4WeightConfig(int4_packing_format="plain")
        if self.packing() == "plain":
            return self.base_config(group_size)
        from torchao.quantization import Int4WeightOnlyConfig
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")

    def fake_quantizers(self, group_size):
        if self.fp8_activations:
            return Int4AfterFloat8(128), Float8Rowwise()
        return Int4Asymmetric(group_size, self.packing()), None

    def record(self, group_size, embedding):
        rec = super().record(group_size, embedding)
        return rec if self.fp8_activations else {**rec, "int4_packing": self.packing()}

    def convert_mismatch(self, rec):
        trained = rec.get("int4_packing")  # absent before the two packings' grids were told apart
        if self.fp8_activations or trained in (None, self.packing()):
            return None
        return (f"this checkpoint trained the grid of int4 packing {trained!r}, but convert here packs "
                f"{self.packing()!r} (plain needs the mslk-cuda package), whose scales round differently; "
                f"convert where the packing is {trained!r}")

    def check_shapes(self, targets, group_size):
        if self.fp8_activations and group_size != 128:
            raise UserError(f"scheme {self.name!r} quantizes weights in groups of 128 (torchao's "
                            f"Float8DynamicActivationInt4WeightConfig); set qat.group_size=128, not {group_size}")
        if group_size not in self.GROUP_SIZES:
            raise UserError(f"scheme {self.name!r} needs qat.group_size in {self.GROUP_SIZES} (the int4 kernels' "
                            f"groups), not {group_size}")
        _check_groups_divide(targets, group_size)

    @property
    def hardware(self) -> str:
        if self.fp8_activations:
            return "a CUDA GPU with sm >= 9.0 (Hopper) and the mslk-cuda package"
        return "a CUDA GPU with sm >= 8.0 (tinygemm, or plain with mslk-cuda)"

    @property
    def convert_path(self) -> str:
        return "real int4 weights on CUDA; elsewhere simulated (fake-quantized forward, labelled)"

    def describe(self, group_size):
        if self.fp8_activations:
            return f"{self.name} (float8 rowwise activations + int4 weights, group 128)"
        return f"{self.name} (asymmetric int4 weights with float zero points, group {group_size})"

    def missing_kernels(self, device, capability=None, mslk=None):
        if self.fp8_activations:
            # both of torchao's fp8-int4 packings (preshuffled, plain) quantize and multiply through mslk
            gap = _cuda_capability_gap(self, device, (9, 0), self.hardware, capability)
            has_mslk = _has_mslk() if mslk is None else mslk
            return gap or (None if has_mslk else f"scheme {self.name!r} needs the mslk-cuda package "
                                                 f"(pip install mslk-cuda) for its f8i4bf16 kernels: both of "
                                                 f"torchao's fp8-int4 packings run through it")
        return _cuda_capability_gap(self, device, (8, 0), self.hardware, capability)


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
        fq = NVFP4Emulated() if self.kind == "nvfp4" else MXFP4Emulated()
        return fq, fq

    def check_shapes(self, targets, group_size):
        check_blocks_divide(self.name, targets, FP4_BLOCK[self.kind])

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

    def missing_kernels(self, device, capability=None, mslk=None):
        if self.kind != "nvfp4":
            return (f"scheme {self.name!r} has no real-kernel convert here yet; its QAT runs emulated "
                    f"(qat.backend=qatlinear) and evaluation must use the simulated model")
        return _cuda_capability_gap(self, device, (10, 0), self.hardware, capability)


def _registry() -> dict[str, Scheme]:
    reg: dict[str, Scheme] = {}
    for b in range(2, 9):
        reg[f"8da{b}w"] = IntxScheme(f"8da{b}w", bits=b, int8_activations=True)
        reg[f"intx{b}-weight-only"] = IntxScheme(f"intx{b}-weight-only", bits=b)
    reg["int4-weight-only"] = Int4Scheme("int4-weight-only")
    reg["fp8-int4"] = Int4Scheme("fp8-int4", fp8_activations=True)
    reg["float8"] = Float8Scheme("float8")
    for kind in FP4_BLOCK:
        reg[kind] = FP4Scheme(kind, kind=kind)
    for fmt in ("q4_0", "q8_0"):
        reg[fmt] = GGUFScheme(fmt, fmt=fmt)
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
    family = rec.get("family")
    if family != scheme.family:
        raise UserError(f"the checkpoint records scheme {scheme.name!r} as family {family!r}, but it is "
                        f"{scheme.family!r} here; convert it with the version that trained it")
    if rec.get("group_size") is not None and not scheme.uses_group_size:
        raise UserError(f"the checkpoint records group_size={rec['group_size']} for scheme {scheme.name!r}, "
                        f"which has no groups")
    return scheme


def training_record(scheme: Optional[Scheme], qat_cfg) -> Optional[dict]:
    """The scheme record of a training run (`qat_cfg`: the qat config section), None for bf16."""
    if scheme is None:
        return None
    q = qat_cfg
    rec = scheme.record(q.group_size, embedding_quant(q.embedding, q.embedding_bits, q.embedding_group_size, scheme))
    return {**rec, "learned_scales": True} if q.learn_scales else rec


def same_record(a: Optional[dict], b: Optional[dict]) -> bool:
    """Two scheme records describe the same training (the family key is implied by the name)."""
    if a is None or b is None:
        return a is b
    sa, sb = scheme_from_record(a), scheme_from_record(b)
    packings = {a.get("int4_packing"), b.get("int4_packing")} - {None}  # unrecorded: any
    return sa is sb and a.get("group_size") == b.get("group_size") and len(packings) <= 1 and \
        embedding_from_record(a, sa) == embedding_from_record(b, sb) and \
        bool(a.get("learned_scales")) == bool(b.get("learned_scales"))
