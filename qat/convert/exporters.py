"""The artifacts convert writes, one exporter each: a name, a folder, its stages, its write.

    adapter     adapter/        LoRA runs: the PEFT adapter (before the merge)
    hf          hf/             the fine-tuned model in the export dtype, LoRA merged
    quantized   quantized/      real quantized weights (QAT convert, or PTQ for a bf16 run)
    simulated   simulated.json  no real kernels here: the scheme record that evaluate --simulate
                                applies as fake quantization to hf/
    gguf        gguf/           --gguf (schemes q4_0, q8_0): .gguf files for llama.cpp, checked by
                                llama.cpp when its Python binding is installed
    pte         model.pte       --formats pte: quantized/'s model for ExecuTorch (XNNPACK), checked
                                in ExecuTorch's runtime (qat/convert/pte.py)

A new format (an ExecuTorch .pte, GGUF) is one more class here plus its name in
ConvertPlan.artifacts. Exporters run in order on one `Job` and add to its report; those with
`before_merge` see the trained model with its adapters, the others the merged, cast model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch
import torch.nn as nn

from qat.config import TrainConfig
from qat.convert.experts import quantize_experts
from qat.convert.io import ConvertIO
from qat.convert.plan import ConvertPlan
from qat.convert.simulated import simulate
from qat.convert.transforms import compare_logits, ptq, qat_convert, quantized_config
from qat.errors import is_rank0
from qat.schemes import Scheme

Stage = Callable[[str], None]


@dataclass
class Job:
    """The state one conversion passes from exporter to exporter."""

    plan: ConvertPlan
    model: nn.Module  # the trained model; after the merge step, merged and cast to `dtype`
    cfg: TrainConfig
    trained_scheme: Optional[Scheme]  # the QAT scheme the model was trained with, None for bf16
    tokenizer: object
    probe: torch.Tensor
    dtype: torch.dtype
    report: dict
    plain: Optional[nn.Module] = None  # the merged model without fake quantizers
    logits: dict = field(default_factory=dict)  # "trained", "fake", "plain", "quantized"
    quantized: Optional[nn.Module] = None  # the converted model, once the quantized exporter ran

    def forward(self, key: str, model: nn.Module, io: ConvertIO) -> Optional[torch.Tensor]:
        if key not in self.logits:
            self.logits[key] = io.forward(model, self.probe)
        return self.logits[key]


class Exporter:
    name: ClassVar[str]
    folder: ClassVar[str]
    before_merge: ClassVar[bool] = False

    def stages(self, job: Job) -> list[str]:
        return [f"{self.folder}"]

    def export(self, job: Job, io: ConvertIO, tmp: Path, stage: Stage) -> None:
        raise NotImplementedError


class AdapterExporter(Exporter):
    name, folder, before_merge = "adapter", "adapter/", True

    def export(self, job, io, tmp, stage):
        stage(self.folder)
        io.save_adapter(job.model, tmp / "adapter")


class HFExporter(Exporter):
    name, folder = "hf", "hf/"

    def export(self, job, io, tmp, stage):
        stage(self.folder)
        io.save_hf(job.plain, job.tokenizer, tmp / "hf", job.dtype, job.cfg.model.path)


class QuantizedExporter(Exporter):
    """QAT runs: the trained scheme through QAT convert; bf16 runs: the same scheme as PTQ."""

    name, folder = "quantized", "quantized/"

    def stages(self, job):
        how = "convert" if job.trained_scheme else "PTQ"
        return ["unquantized forward", f"{how} {job.plan.scheme.name}", self.folder] + \
            (["reload check"] if job.plan.reload_check else [])

    def export(self, job, io, tmp, stage):
        plan = job.plan
        names = iter(self.stages(job))
        stage(next(names))
        plain_logits = job.forward("plain", job.plain, io)
        stage(next(names))
        if job.trained_scheme:
            quant = qat_convert(job.model, plan.scheme, plan.group_size, plan.embedding)
        else:
            quant = ptq(job.plain, plan.scheme, plan.group_size)
        experts = quantize_experts(quant, plan.scheme, plan.group_size)
        if experts is not None:
            job.report["experts"] = experts
        job.quantized = quant
        q_logits = job.forward("quantized", quant, io)
        job.report.update({"mode": "qat" if job.trained_scheme else "ptq",
                           "scheme": plan.scheme.record(plan.group_size, plan.embedding),
                           "scheme_description": plan.scheme.describe(plan.group_size), "lora": plan.lora,
                           "dtype": str(job.dtype).replace("torch.", "")})
        if io.has_logits:
            job.report.update(logit_checks(q_logits, plain_logits, job.logits["trained"], job.logits.get("fake"),
                                           merged_lora=job.trained_scheme is not None and job.cfg.qat.lora_merged))
        job.report = io.share(job.report)
        check_exact(job.report, plan.scheme)
        stage(next(names))
        qcfg = quantized_config(quant, plan.scheme, plan.group_size, plan.embedding)
        io.save_quantized(quant, job.tokenizer, tmp / "quantized", qcfg, job.dtype, job.cfg.model.path)
        if plan.reload_check:
            stage(next(names))
            job.report["reload_equal"] = io.reload_matches(quant, tmp / "quantized", job.probe, q_logits)


class SimulatedExporter(Exporter):
    """No real kernels here: record how the fake-quantized model (what evaluate --simulate runs)
    compares, and the scheme record that evaluation applies."""

    name, folder = "simulated", "simulated.json"

    def stages(self, job):
        return ["unquantized forward", "simulated forward"]

    def export(self, job, io, tmp, stage):
        plan = job.plan
        stage("unquantized forward")
        plain_logits = job.forward("plain", job.plain, io)
        stage("simulated forward")
        sim = simulate(copy.deepcopy(job.plain), plan.scheme, plan.group_size)
        sim_logits = io.forward(sim, job.probe)
        job.logits["simulated"] = sim_logits
        job.report.update({"mode": "simulated", "simulated": True, "scheme": plan.scheme.record(plan.group_size, None),
                           "scheme_description": plan.scheme.describe(plan.group_size)
                           + " (simulated: fake-quantized forward, no real kernels)"})
        if io.has_logits:
            job.report["simulated_vs_unquantized"] = compare_logits(sim_logits, plain_logits)
            if job.logits.get("fake") is not None:
                job.report["simulated_equals_training_forward"] = bool(torch.equal(sim_logits, job.logits["fake"]))
        job.report = io.share(job.report)
        if is_rank0():
            (tmp / "simulated.json").write_text(json.dumps(job.report["scheme"], indent=2))


class GGUFExporter(Exporter):
    """gguf/model-<scheme>.gguf: the scheme's codes (trained, or PTQ of a bf16 run) as GGUF blocks, the
    rest in the --gguf dtype; a bf16 run also gets gguf/model-<dtype>.gguf, unquantized. With
    llama-cpp-python installed, llama.cpp loads the file and its top-1 next token is compared with
    the simulated (fake-quantized) forward on the probe batch."""

    name, folder = "gguf", "gguf/"

    def files(self, job) -> dict[str, Optional[str]]:
        """File name -> GGUF weight format (None: unquantized)."""
        plan = job.plan
        files = {f"model-{plan.scheme.name}.gguf": plan.scheme.fmt}
        return files if job.trained_scheme else {**files, f"model-{plan.gguf}.gguf": None}

    def export(self, job, io, tmp, stage):
        from qat.convert.gguf_check import has_llama_cpp
        from qat.convert.gguf_writer import write_gguf
        from qat.layout import decoder_blocks, experts_modules
        from qat.model import qat_targets

        stage(self.folder)
        (tmp / "gguf").mkdir()
        # the scheme's Linears and fused experts (qat/moe.py fake-quantizes every expert's matrix)
        experts = {id(m) for m in experts_modules(decoder_blocks(job.plain)).values()}
        targets = set(qat_targets(job.plain)) | {n for n, m in job.plain.named_modules() if id(m) in experts}
        report = {"dtype": job.plan.gguf, "files": {}}
        for fname, fmt in self.files(job).items():
            types = write_gguf(job.plain, job.tokenizer, tmp / "gguf" / fname, fmt, targets if fmt else set(),
                               job.plan.gguf, Path(job.cfg.model.path).name)
            report["files"][fname] = {"tensors": {t: sum(v == t for v in types.values()) for t in set(types.values())}}
        quantized = tmp / "gguf" / next(iter(self.files(job)))
        if has_llama_cpp() and job.logits.get("simulated") is not None:
            from qat.convert.gguf_check import load, top1_agreement

            llm = load(quantized, n_ctx=job.probe.shape[1])
            report["llama_cpp_vs_simulated"] = top1_agreement(llm, job.probe, job.logits["simulated"],
                                                              job.tokenizer.pad_token_id)
            llm.close()
        job.report["gguf"] = report


class PteExporter(Exporter):
    """The converted model (quantized/, in memory) as an ExecuTorch program lowered to XNNPACK, then
    loaded in ExecuTorch's runtime and compared with the converted model."""

    name, folder = "pte", "model.pte"

    def stages(self, job):
        return ["pte export", "pte lower", "pte runtime check"]

    def export(self, job, io, tmp, stage):
        from qat.convert import pte

        window = job.cfg.data.seq_len
        stage("pte export")
        programs = pte.export_programs(job.quantized, window, max_cache_len=window)
        stage("pte lower")
        edge = pte.lower(programs)
        linears = {m: pte.linear_counts(edge, m) for m in pte.METHODS}
        total = pte.count_linears(job.quantized)
        if any(c["delegated"] != total or c["not_delegated"] for c in linears.values()):
            raise RuntimeError(f"ExecuTorch: every Linear ({total}) must run in XNNPACK: {linears}")
        (tmp / "model.pte").write_bytes(edge.to_executorch().buffer)
        stage("pte runtime check")
        runner = pte.PteRunner(tmp / "model.pte")
        checks = pte.runtime_checks(runner, job.quantized, job.probe, job.tokenizer.pad_token_id)
        job.report["pte"] = {"file": "model.pte", "methods": {"forward": f"1 token, static KV cache of {window}",
                                                              "window": f"{window} tokens, no cache"},
                             "backend": "XnnpackBackend", "linears": total, "linears_by_method": linears,
                             **checks}


EXPORTERS: dict[str, Exporter] = {e.name: e for e in (AdapterExporter(), HFExporter(), QuantizedExporter(),
                                                       SimulatedExporter(), GGUFExporter(), PteExporter())}


def logit_checks(q_logits, plain_logits, trained_logits, fake_logits, merged_lora: bool) -> dict:
    out = {"converted_vs_unquantized": compare_logits(q_logits, plain_logits),
           "converted_vs_training_forward": compare_logits(q_logits, trained_logits)}
    if fake_logits is not None:
        out["converted_vs_fake_quant"] = compare_logits(q_logits, fake_logits)
        out["converted_equals_fake_quant"] = bool(torch.equal(q_logits, fake_logits))
    if merged_lora:  # merged-weight LoRA QAT trains exactly the function that is deployed
        out["converted_equals_training_forward"] = bool(torch.equal(q_logits, trained_logits))
    return out


def check_exact(report: dict, scheme: Scheme) -> None:
    """The equalities that must hold exactly for the scheme; a failure here is a bug, not bad input."""
    if not scheme.exact_convert:
        return
    if report.get("converted_equals_fake_quant") is False:
        raise RuntimeError(f"converted logits differ from fake-quantized logits for scheme "
                           f"{scheme.name}: {report['converted_vs_fake_quant']}")
    if report.get("converted_equals_training_forward") is False:
        raise RuntimeError(f"lora_merged: converted logits differ from the training forward: "
                           f"{report['converted_vs_training_forward']}")
