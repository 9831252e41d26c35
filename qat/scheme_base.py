"""What every quantization scheme family shares: the `Scheme` base class (what a family defines,
and the record a checkpoint stores), the input embedding's own quantization, and shape helpers.
The families and the name registry are in qat/schemes.py (and qat/gguf_scheme.py)."""

from __future__ import annotations

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
    # Its weight scales can be trained (qat.learn_scales): an affine grid with one scale per group.
    learnable_scales: ClassVar[bool] = False
    # torchao has kernels for it on some hardware; without any, convert always writes it simulated.
    torchao_kernels: ClassVar[bool] = True
    # convert --gguf can write it as a GGUF block format (llama.cpp).
    gguf_format: ClassVar[bool] = False

    # --- what each family defines ------------------------------------------------------------
    def base_config(self, group_size: Optional[int]):
        """The torchao PTQ config; QATConfig(base_config, step=...) derives fake quantization from it."""
        raise NotImplementedError(f"{type(self).__name__} defines no base_config")

    def convert_config(self, group_size: Optional[int]):
        """The torchao config that convert and PTQ apply: the base config, unless the family picks a
        packing for the kernels this machine has."""
        return self.base_config(group_size)

    def fake_quantizers(self, group_size: Optional[int]):
        """(weight fake quantizer, activation fake quantizer or None) for our QATLinear."""
        raise NotImplementedError(f"{type(self).__name__} defines no fake quantizers")

    def check_shapes(self, targets: dict[str, nn.Module], group_size: Optional[int]) -> None:
        """Raise UserError naming the first targeted layer whose shape the format cannot split."""

    @property
    def expert_weight_bits(self) -> Optional[int]:
        """Bits of torchao's intx weight-only 3D format for MoE expert weights [E, out, in], or None
        where the scheme has no 3D format that runs (convert then stores them simulated)."""
        return None

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
    @property
    def default_embedding_bits(self) -> int:
        """Bits of the input embedding when qat.embedding=true and qat.embedding_bits is unset."""
        return 8

    def record(self, group_size: Optional[int], embedding: Optional["EmbeddingQuant"]) -> dict:
        """What a checkpoint stores so that convert rebuilds exactly this scheme."""
        return {"scheme": self.name, "family": self.family,
                "group_size": group_size if self.uses_group_size else None, "embedding": embedding is not None,
                "embedding_bits": embedding.bits if embedding else None,
                "embedding_group_size": embedding.group_size if embedding else None}

    # Its real kernels run on the CPU too (intx): convert then quantizes there on any machine.
    cpu_kernels: ClassVar[bool] = False
    # The weight dtype its real kernels pack ("bf16"), or None for any export dtype.
    kernel_dtype: ClassVar[Optional[str]] = None

    def missing_kernels(self, device: torch.device, capability: Optional[tuple[int, int]] = None,
                        mslk: Optional[bool] = None) -> Optional[str]:
        """None when `device` runs this scheme's real quantized kernels, else why not (one line).
        `capability` (a CUDA device's sm) and `mslk` (whether the mslk-cuda package imports) default
        to this machine's; passing them decides for another machine without touching a GPU."""
        return None

    def convert_mismatch(self, rec: dict) -> Optional[str]:
        """None when this machine's real convert writes the grid a checkpoint record trained, else why not."""
        return None

    def check_hardware(self, device: torch.device) -> None:
        """For what needs real kernels: convert, and training with qat.backend=torchao."""
        why = self.missing_kernels(device)
        if why:
            raise UserError(why)


def _cuda_capability_gap(scheme: Scheme, device: torch.device, need: tuple[int, int], what: str,
                         capability: Optional[tuple[int, int]] = None) -> Optional[str]:
    if device.type != "cuda":
        return f"scheme {scheme.name!r} needs {what}; this run is on {device.type}"
    cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability(device)
    if cap < need:
        gpu = torch.cuda.get_device_name(device) if capability is None else "this GPU"
        return f"scheme {scheme.name!r} needs {what} (sm >= {need[0]}.{need[1]}); {gpu} is sm {cap[0]}.{cap[1]}"
    return None


def _reduction_dim(mod: nn.Module) -> int:
    """The dimension a weight's groups or blocks run along: in_features, or an embedding's width."""
    return mod.in_features if isinstance(mod, nn.Linear) else mod.embedding_dim


@dataclass(frozen=True)
class EmbeddingQuant:
    """The input embedding's own quantization (qat.embedding=true): symmetric intN weight-only, per
    group of `group_size` along the embedding width, or per row when null. Its bits are its own, as
    in the ExecuTorch recipe (8da4w linears, int8 embeddings); a lookup has no activations to quantize."""

    bits: int
    group_size: Optional[int]

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise UserError(f"qat.embedding_bits={self.bits} is outside 2..8")

    def config(self):
        from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup

        gran = PerGroup(self.group_size) if self.group_size else PerAxis(0)
        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{self.bits}"), granularity=gran)

    def check_shapes(self, name: str, emb: nn.Embedding) -> None:
        if self.group_size and emb.embedding_dim % self.group_size:
            raise UserError(f"qat.embedding_group_size={self.group_size} does not divide the width "
                            f"{emb.embedding_dim} of {name}; pick a divisor or null for per-row")


def embedding_quant(enabled: bool, bits: Optional[int], group_size: Optional[int],
                    scheme: "Scheme") -> Optional[EmbeddingQuant]:
    """The embedding's quantization from the qat config fields, or None when it stays high precision."""
    return EmbeddingQuant(bits or scheme.default_embedding_bits, group_size) if enabled else None


def embedding_from_record(rec: dict, scheme: "Scheme") -> Optional[EmbeddingQuant]:
    """The input embedding's quantization a checkpoint recorded, or None."""
    if not rec.get("embedding"):
        return None
    return EmbeddingQuant(rec["embedding_bits"], rec["embedding_group_size"])


def _check_groups_divide(targets: dict[str, nn.Module], group_size: Optional[int]) -> None:
    if not group_size:
        return
    for fqn, mod in targets.items():
        dim = _reduction_dim(mod)
        if dim % group_size:
            raise UserError(f"qat.group_size={group_size} does not divide in_features={dim} of layer "
                            f"{fqn}; pick a divisor of {dim} or null for per-channel")


def check_blocks_divide(scheme: str, targets: dict[str, nn.Module], block: int, what: str = "") -> None:
    """Raise naming the first targeted layer whose reduction dimension the scheme's fixed block
    size does not divide (FP4's 16 or 32, GGUF's 32)."""
    for fqn, mod in targets.items():
        if _reduction_dim(mod) % block:
            raise UserError(f"scheme {scheme!r} needs in_features divisible by {block}{what}: layer {fqn} has "
                            f"{_reduction_dim(mod)}")
