"""The conversion pipeline, identical for one process and for a slice per torchrun rank:

    trained forward -> [adapter/] -> merge LoRA, cast, unfake -> hf/ -> quantized/ | simulated.json
                                                                      -> verify.json

Merging must come before quantization: converting first and merging afterwards fails in torchao
(NotImplementedError on aten.add_ for quantized tensors). Every forward, save and cross-rank
decision goes through a `ConvertIO`; logits exist only where `io.has_logits` (the last rank of a
sharded run), the report is computed there and shared, so every rank takes the same decisions.
One process runs on the plan's device (the GPU whose kernels a CUDA-only scheme needs, else the
CPU); logits always come back to the host, so every comparison is the same whatever the device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from qat.atomic import atomic_dir
from qat.convert.exporters import EXPORTERS, Job
from qat.convert.io import ConvertIO, LocalIO
from qat.convert.plan import ConvertPlan
from qat.convert.transforms import cast_for_export, unfake
from qat.errors import UserError, is_rank0
from qat.model import DTYPES


def run_convert(plan: ConvertPlan) -> dict:
    """Write plan.out atomically: in one process, or sliced across ranks under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _convert_sharded(plan)
    from qat.convert.transforms import load_trained

    loaded = load_trained(plan.checkpoint, plan.device)
    with atomic_dir(plan.out, "the export") as tmp:
        return convert(loaded, plan, LocalIO(torch.device(plan.device)), tmp)


def _convert_sharded(plan: ConvertPlan) -> dict:
    """Under torchrun: each rank loads, converts and writes only its slice (qat/convert/sharded.py)."""
    import torch.distributed as dist

    from qat.convert.sharded import ShardedIO, agree, load_part, run_in_shared_dir
    from qat.distributed import cleanup, init_distributed

    if plan.formats:  # an ExecuTorch program is traced from the whole model in one process
        raise UserError(f"--formats {','.join(plan.formats)} needs the whole model in one process: run convert "
                        f"without torchrun")
    if plan.device != "cpu":  # the slices and the pipeline's send/recv live in host memory (gloo)
        raise UserError(f"scheme {plan.scheme.name!r} converts with CUDA kernels, in one process: run convert "
                        f"without torchrun, or with --simulate to export hf/ sliced")
    init_distributed(torch.device("cpu"))  # gloo: the slices live in host memory
    try:
        loaded, part, tied = agree(load_part, plan.checkpoint, dist.get_rank(), dist.get_world_size())
        io = ShardedIO(part, tied)
        return run_in_shared_dir(plan.out, part, lambda tmp: convert(loaded, plan, io, tmp))
    finally:
        cleanup()


def convert(loaded, plan: ConvertPlan, io: ConvertIO, tmp: Path) -> dict:
    """Run the plan's exporters on a loaded (model, cfg, meta, trained scheme) into `tmp`."""
    from qat.model import load_tokenizer

    model, cfg, meta, trained_scheme = loaded
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code,
                               key="the run's model.path", need_pad=True)
    dtype = DTYPES[cfg.training.dtype if plan.dtype == "auto" else plan.dtype]
    job = Job(plan=plan, model=model, cfg=cfg, trained_scheme=trained_scheme, tokenizer=tokenizer,
              probe=probe_batch(tokenizer, cfg), dtype=dtype,
              report={"checkpoint": str(plan.checkpoint), "step": meta["step"], "mode": "hf-only",
                      "training": "qat" if trained_scheme else "bf16", "qat_coverage": meta.get("qat_coverage"),
                      "device": plan.device})
    exporters = [EXPORTERS[name] for name in plan.artifacts]
    stage = Stages(["trained forward", "merge, cast"] + [s for e in exporters for s in e.stages(job)])
    with torch.no_grad():
        stage("trained forward")
        job.forward("trained", job.model, io)
        for e in (e for e in exporters if e.before_merge):
            e.export(job, io, tmp, stage)
        stage("merge, cast")
        merge_and_cast(job, io)
        for e in (e for e in exporters if not e.before_merge):
            e.export(job, io, tmp, stage)
    stage.close()
    return write_report(tmp, job.report, io)


def merge_and_cast(job: Job, io: ConvertIO) -> None:
    """LoRA merged into the base, the export dtype, and `plain`: the same model without fake quantizers."""
    if job.cfg.lora.enabled:
        job.model = job.model.merge_and_unload()
    job.model = cast_for_export(job.model, job.dtype)
    if job.trained_scheme is not None:
        job.forward("fake", job.model, io)
    job.plain = unfake(job.model)


def probe_batch(tokenizer, cfg) -> torch.Tensor:
    """A fixed batch: the first rows of the run's first data source, or a fixed text."""
    from qat.data import load_source

    try:
        ds, column = load_source(cfg.data.sources[0], 0)
        rows = list(ds.select(range(min(4, len(ds))))[column])
        texts = [r if isinstance(r, str) else tokenizer.apply_chat_template(r, tokenize=False) for r in rows]
    except (UserError, OSError, ValueError):
        texts = ["The quick brown fox jumps over the lazy dog. " * 8] * 2
    enc = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=64)
    return enc["input_ids"]


def write_report(tmp: Path, report: dict, io: ConvertIO) -> dict:
    """verify.json, with the peak host memory of the whole conversion (every rank's if sharded)."""
    report = {**report, **io.record()}
    if is_rank0():
        (tmp / "verify.json").write_text(json.dumps(report, indent=2))
    return report


class Stages:
    """A tqdm bar over convert's named stages, on rank 0: with a large model each takes minutes."""

    def __init__(self, names: list[str]):
        from qat.progress import progress_bar

        self.bar = progress_bar(len(names), "convert", unit="stage", disable=not is_rank0())
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        self.bar.update(1)
        self.bar.close()
