"""What a conversion will do, decided before any weight is read: the typed plan.

`make_plan` resolves the user's request (a checkpoint or run folder, an optional PTQ scheme, the
export dtype, whether to quantize) against the checkpoint's own record and this machine's
kernels. Every refusal happens here, as one line, so a bad request writes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from qat import checkpoint as ckpt
from qat.atomic import check_target
from qat.distributed import pick_device
from qat.errors import UserError
from qat.schemes import EmbeddingQuant, Scheme, embedding_from_record, get_scheme, scheme_from_record

QUANTIZE_MODES = ("real", "simulated", "none")


@dataclass(frozen=True)
class PTQRequest:
    """The post-training quantization for a bf16 checkpoint; a QAT checkpoint converts with its own
    scheme whatever is requested here (the plan decides which applies)."""

    scheme: str = "8da4w"
    group_size: Optional[int] = 32  # None: per output channel


@dataclass(frozen=True)
class ConvertPlan:
    checkpoint: Path  # a complete step-NNNNNN folder
    out: Path
    scheme: Scheme  # the trained scheme (QAT run), or the PTQ scheme (bf16 run)
    group_size: Optional[int]
    embedding: Optional[EmbeddingQuant]  # the input embedding's quantization, if it was trained with one
    trained: bool  # True for a QAT run: convert with its own scheme, and compare with its forward
    lora: bool
    dtype: str = "auto"  # export dtype: "auto" (the training compute dtype), "bf16" or "fp32"
    # "real": quantized/ with torchao kernels; "simulated": no real kernels here, so hf/ plus
    # simulated.json for a fake-quantized evaluation; "none": hf/ only (e.g. a pretrained base).
    quantize: str = "real"
    reload_check: bool = True
    # Where the model is quantized, verified and reloaded: the CPU for schemes whose real kernels run
    # there (intx) and for simulated or hf-only exports; the GPU whose kernels the scheme needs
    # otherwise (int4, float8, nvfp4). Loading and the hf/ and adapter/ folders are the same either way.
    device: str = "cpu"
    # gguf/ for llama.cpp: None (off), or the dtype ("f16", "f32") of the tensors outside the scheme
    gguf: Optional[str] = None
    formats: tuple[str, ...] = ()  # extra formats after quantized/: "pte" (ExecuTorch, qat/convert/pte.py)

    def __post_init__(self):
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize={self.quantize!r} is not one of {QUANTIZE_MODES}")
        if self.device != "cpu" and self.quantize != "real":
            raise ValueError(f"device={self.device!r}: only a real-kernel convert leaves the CPU")

    @property
    def artifacts(self) -> list[str]:
        """Exporter names (qat/convert/exporters.py), in the order they run."""
        names = (["adapter"] if self.lora else []) + ["hf"]
        names += {"real": ["quantized"], "simulated": ["simulated"], "none": []}[self.quantize]
        return names + (["gguf"] if self.gguf else []) + list(self.formats)


def find_checkpoint(path: Path) -> Path:
    """A step-NNNNNN folder as given, or the newest complete one of a run or checkpoint folder."""
    path = Path(path)
    if ckpt.STEP_RE.match(path.name):
        ckpt.read_meta(path)
        return path
    for root in (path, path / "checkpoints"):
        found = ckpt.list_checkpoints(root)
        if found:
            return found[-1]
    raise UserError(f"{path} is not a checkpoint: no complete step-NNNNNN folder in it or in {path}/checkpoints")


def choose_scheme(meta: dict, scheme: Optional[str], group_size: Optional[int], per_channel: bool,
                  ptq: PTQRequest) -> tuple[Scheme, Optional[int], Optional[EmbeddingQuant]]:
    """(scheme, group size, embedding quantization): a QAT checkpoint's own record, refusing a
    disagreeing explicit request; for a bf16 checkpoint, PTQ (decoder Linears only) with the
    explicit request, else `ptq`."""
    rec = meta.get("qat")
    if rec is not None:
        if scheme and scheme != rec["scheme"]:
            raise UserError(f"this checkpoint was trained with QAT scheme {rec['scheme']!r}; converting it "
                            f"with {scheme!r} would not match training (omit --scheme)")
        if group_size is not None and group_size != rec["group_size"]:
            raise UserError(f"this checkpoint was trained with group_size={rec['group_size']}, not {group_size}")
        trained = scheme_from_record(rec)
        return trained, rec["group_size"], embedding_from_record(rec, trained)
    chosen = get_scheme(scheme or ptq.scheme)
    per_channel = per_channel or (scheme is None and ptq.group_size is None)
    group = None if per_channel or not chosen.uses_group_size else (group_size or ptq.group_size or
                                                                     PTQRequest.group_size)
    return chosen, group, None


def kernel_device(scheme: Scheme, machine: torch.device, capability: Optional[tuple[int, int]] = None,
                  mslk: Optional[bool] = None) -> tuple[torch.device, Optional[str]]:
    """(where convert quantizes, why `machine` lacks the scheme's real kernels or None).

    A scheme whose kernels run on the CPU converts there on any machine: the intx convert equals
    the fake-quantized forward bit for bit on the CPU, and a GPU would only add a copy. Any other
    scheme converts on `machine` when it has the kernels (int4 packing, for one, is CUDA only);
    without them the answer is the CPU and the reason, and the plan refuses or simulates.
    `capability` and `mslk` default to this machine's (Scheme.missing_kernels)."""
    if scheme.cpu_kernels:
        return torch.device("cpu"), None
    why = scheme.missing_kernels(machine, capability, mslk)
    return (torch.device("cpu") if why else machine), why


def make_plan(checkpoint: Path, out: Optional[Path] = None, scheme: Optional[str] = None,
              group_size: Optional[int] = None, per_channel: bool = False, dtype: str = "auto",
              simulate: bool = False, only_hf: bool = False, reload_check: bool = True,
              device: Optional[torch.device] = None, ptq: PTQRequest = PTQRequest(),
              capability: Optional[tuple[int, int]] = None, mslk: Optional[bool] = None,
              gguf: Optional[str] = None, formats: tuple[str, ...] = ()) -> ConvertPlan:
    """Resolve a conversion request. scheme/group_size/per_channel: an explicit request (must agree
    with a QAT checkpoint's record); `ptq`: what a bf16 checkpoint gets without one; `device`: where
    real kernels would run (default: this machine's), with its `capability` and `mslk` (default:
    what this machine has; see kernel_device); `gguf`: also write gguf/ with that dtype outside the
    scheme; `formats`: extra formats (FORMATS) made from quantized/."""
    path = find_checkpoint(Path(checkpoint))
    meta = ckpt.read_meta(path)
    chosen, group, embedding = choose_scheme(meta, scheme, group_size, per_channel, ptq)
    quantize = "none" if only_hf else "real"
    export_dtype = meta["config"]["training"]["dtype"] if dtype == "auto" else dtype
    check_formats(tuple(formats), chosen, embedding, quantize, export_dtype, group)  # XNNPACK schemes: on the CPU
    where, why = kernel_device(chosen, device or pick_device("auto"), capability, mslk)
    why = None if only_hf else why
    check_gguf(chosen, meta, gguf, only_hf)
    simulate = simulate or not chosen.torchao_kernels  # its real form is the .gguf, not a torchao folder
    if why and not simulate:
        raise UserError(f"{why}. Real kernels are missing here: rerun with --simulate to export hf/ and evaluate "
                        f"the fake-quantized model (evaluate.py --simulate {chosen.name}; labelled simulated)")
    if why:
        quantize = "simulated"
    mismatch = chosen.convert_mismatch(meta["qat"]) if meta.get("qat") and quantize == "real" else None
    if mismatch:
        raise UserError(mismatch)
    if quantize == "real":
        check_export_dtype(chosen, meta, dtype)
    lora = bool(meta.get("lora"))
    out = Path(out) if out else path.parent.parent / "export" / path.name
    check_target(out, folder=True, what="--out")  # before minutes of loading
    return ConvertPlan(checkpoint=path, out=out,
                       scheme=chosen, group_size=group, embedding=embedding, trained=meta.get("qat") is not None,
                       lora=lora, dtype=dtype, quantize=quantize, reload_check=reload_check,
                       device=str(where) if quantize == "real" else "cpu", gguf=gguf, formats=tuple(formats))


GGUF_DTYPES = ("f16", "f32")


def check_gguf(scheme: Scheme, meta: dict, gguf: Optional[str], only_hf: bool) -> None:
    """A GGUF export needs a GGUF block scheme (trained, or as PTQ of a bf16 run)."""
    if gguf is None:
        return
    if gguf not in GGUF_DTYPES:
        raise UserError(f"--gguf {gguf!r}: the dtype of the tensors outside the scheme is one of {GGUF_DTYPES}")
    if only_hf:
        raise UserError("--gguf writes quantized codes; it cannot go with --only-hf")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--gguf writes one file from the whole model: run convert without torchrun")
    if not scheme.gguf_format:
        how = "this checkpoint was trained with" if meta.get("qat") else "PTQ would use"
        raise UserError(f"--gguf needs a GGUF scheme (q4_0 or q8_0), but {how} {scheme.name!r}"
                        + ("" if meta.get("qat") else "; add --scheme q4_0 or --scheme q8_0"))
    if "model" in meta.get("config", {}):  # the run's architecture and tokenizer, before minutes of loading
        from qat.config import config_from_dict
        from qat.convert.gguf_writer import check_source

        check_source(config_from_dict(meta["config"]).model)


FORMATS = ("pte",)


def check_formats(formats: tuple[str, ...], scheme: Scheme, embedding: Optional[EmbeddingQuant], quantize: str,
                  export_dtype: str = "fp32", group_size: Optional[int] = None) -> None:
    """Extra formats are made from the real quantized model: refuse what cannot be, before loading."""
    for f in formats:
        if f not in FORMATS:
            raise UserError(f"--formats {f!r}: not a format convert writes; choose from {', '.join(FORMATS)}")
    if "pte" in formats:
        from qat.convert.pte import check_pte_scheme, require_executorch

        if quantize != "real":
            raise UserError("--formats pte exports the real quantized model: drop --simulate/--only-hf")
        check_pte_scheme(scheme, embedding, group_size)
        if export_dtype != "fp32":  # XNNPACK's quantized kernels take fp32 (or fp16) activations, not bf16
            raise UserError(f"--formats pte: XNNPACK runs the {scheme.name} model in fp32; this export would be "
                            f"{export_dtype}: rerun with --dtype fp32")
        require_executorch()


def check_export_dtype(scheme: Scheme, meta: dict, dtype: str) -> None:
    """The scheme's real kernels take the export dtype ("auto": the run's training dtype)."""
    resolved = meta["config"]["training"]["dtype"] if dtype == "auto" else dtype
    need = scheme.kernel_dtype
    if need is not None and resolved != need:
        raise UserError(f"scheme {scheme.name!r} packs {need} weights for its kernels; this export would be "
                        f"{resolved} (--dtype {dtype}): rerun with --dtype {need}")
