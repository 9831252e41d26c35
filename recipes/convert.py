"""Convert a training checkpoint into deployable HF folders, and verify the conversion.

    python recipes/convert.py --checkpoint runs/qat/checkpoints/step-000150 --out runs/qat/export
    python recipes/convert.py --checkpoint runs/bf16 --scheme 8da4w      # newest checkpoint, PTQ
    torchrun --nproc_per_node 4 recipes/convert.py --checkpoint runs/qat  # too big for one host

Under torchrun (any number of nodes sharing a filesystem) each rank loads, converts and writes only
a contiguous slice of the decoder blocks, so no process ever holds the whole model; the folders
are the same as one process writes, with the weights in one safetensors shard per rank.

Writes, atomically (a temporary folder renamed at the end):
  hf/          the fine-tuned model in the export dtype, LoRA merged (config, tokenizer, safetensors)
  adapter/     LoRA runs: the PEFT adapter; PeftModel.from_pretrained(base, adapter/) == hf/
  quantized/   real quantized weights. QAT runs: the checkpoint's own scheme through
               QATConfig(step="convert"). bf16 runs: --scheme as post-training quantization.
               AutoModelForCausalLM.from_pretrained(quantized/) loads it.
  verify.json  on a fixed probe batch: converted vs fake-quantized logits (exact for intx
               schemes: asserted), converted vs the unquantized model (relative error, top-1
               agreement), and the reloaded quantized folder vs the in-memory one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # before torch's seconds of imports: a torchrun worker dies with torchrun
    from qat.lifeline import exit_with_launcher

    exit_with_launcher()

import torch

from qat import checkpoint as ckpt
from qat.atomic import atomic_dir
from qat.errors import UserError, exit_on_user_error, is_rank0

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a step-NNNNNN folder, or a run/checkpoint folder (its newest complete checkpoint)")
    p.add_argument("--out", help="output folder (default: <run>/export/step-NNNNNN)")
    p.add_argument("--scheme", help="PTQ scheme for bf16 runs (default 8da4w); for QAT runs it must "
                                    "match the trained scheme if given")
    p.add_argument("--group-size", type=int, default=None, help="PTQ group size for bf16 runs (default 32)")
    p.add_argument("--per-channel", action="store_true", help="PTQ per output channel (bf16 runs)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="export dtype; auto = the training compute dtype")
    p.add_argument("--simulate", action="store_true",
                   help="when this machine lacks the scheme's real kernels: write hf/ and simulated.json "
                        "instead of quantized/; evaluate with evaluate.py --simulate (labelled simulated)")
    p.add_argument("--only-hf", action="store_true", help="write only hf/ (e.g. a pretrained base model)")
    p.add_argument("--no-reload-check", action="store_true", help="skip reloading quantized/ to compare logits")
    return p.parse_args(argv)


def find_checkpoint(path: Path) -> Path:
    path = Path(path)
    if ckpt.STEP_RE.match(path.name):
        ckpt.read_meta(path)
        return path
    for root in (path, path / "checkpoints"):
        found = ckpt.list_checkpoints(root)
        if found:
            return found[-1]
    raise UserError(f"{path} is not a checkpoint: no complete step-NNNNNN folder in it or in {path}/checkpoints")


def choose_scheme(meta: dict, args) -> tuple[str, object, bool]:
    """(scheme name, group size, embedding) that convert applies, refusing disagreements."""
    rec = meta.get("qat")
    if rec is not None:
        if args.scheme and args.scheme != rec["scheme"]:
            raise UserError(f"this checkpoint was trained with QAT scheme {rec['scheme']!r}; converting it "
                            f"with {args.scheme!r} would not match training (omit --scheme)")
        if args.group_size is not None and args.group_size != rec["group_size"]:
            raise UserError(f"this checkpoint was trained with group_size={rec['group_size']}, not {args.group_size}")
        return rec["scheme"], rec["group_size"], rec["embedding"]
    group = None if args.per_channel else (args.group_size or 32)
    return args.scheme or "8da4w", group, False


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


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    path = find_checkpoint(Path(args.checkpoint))
    meta = ckpt.read_meta(path)
    out = Path(args.out) if args.out else path.parent.parent / "export" / path.name
    name, group, embedding = choose_scheme(meta, args)
    from qat.schemes import get_scheme

    scheme = get_scheme(name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    simulate = False
    try:
        scheme.check_hardware(device)
    except UserError as e:
        if not args.simulate:
            raise UserError(f"{e}. Real kernels are missing here: rerun with --simulate to export hf/ and "
                            f"evaluate the fake-quantized model (evaluate.py --simulate {name}; labelled "
                            f"simulated)") from None
        simulate = True
    job = dict(path=path, scheme=scheme, group=group, embedding=embedding, args=args, simulate=simulate)
    report = convert_sharded(out, **job) if world_size() > 1 else convert_local(out, **job)
    if is_rank0():
        print(json.dumps(report, indent=2))
        print(f"wrote {out}")


def convert_local(out: Path, **job) -> dict:
    """One process holds the whole model."""
    from qat.export import LocalIO, load_trained

    loaded = load_trained(job["path"])
    with atomic_dir(out) as tmp:
        return convert(loaded, tmp=tmp, io=LocalIO(), **job)


def convert_sharded(out: Path, **job) -> dict:
    """Under torchrun: each rank loads, converts and writes only its slice (qat/sharded_export.py)."""
    import torch.distributed as dist

    from qat.distributed import cleanup, init_distributed
    from qat.sharded_export import ShardedIO, agree, load_part, run_in_shared_dir

    init_distributed(torch.device("cpu"))  # gloo: the slices live in host memory
    try:
        loaded, part, tied = agree(load_part, job["path"], dist.get_rank(), dist.get_world_size())
        io = ShardedIO(part, tied)
        return run_in_shared_dir(out, part, lambda tmp: convert(loaded, tmp=tmp, io=io, **job))
    finally:
        cleanup()


def convert(loaded, path: Path, scheme, group, embedding, args, tmp: Path, io, simulate: bool = False) -> dict:
    """The conversion steps, identical for one process and for slices; `io` does forward/save/share.

    Logits exist only where io.has_logits (the last rank of a sharded run); the report is computed
    there and shared, so every rank takes the same decisions.
    """
    from transformers import AutoTokenizer

    from qat.export import cast_for_export, ptq, qat_convert, quantized_config, unfake

    model, cfg, meta, trained_scheme = loaded
    dtype = DTYPES[cfg.training.dtype if args.dtype == "auto" else args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, revision=cfg.model.revision,
                                              trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    probe = probe_batch(tokenizer, cfg)
    base = {"checkpoint": str(path), "step": meta["step"], "qat_coverage": meta.get("qat_coverage")}
    tail = 0 if args.only_hf else 1 + (1 if simulate else 2 + (not args.no_reload_check))
    stage = Stages(2 + cfg.lora.enabled + tail)
    with torch.no_grad():
        stage("trained forward")
        trained_logits = io.forward(model, probe)
        if cfg.lora.enabled:
            stage("adapter/, merge")
            io.save_adapter(model, tmp / "adapter")
            model = model.merge_and_unload()
        stage("hf/")
        model = cast_for_export(model, dtype)
        fake_logits = io.forward(model, probe) if trained_scheme else None
        plain = unfake(model)
        io.save_hf(plain, tokenizer, tmp / "hf", dtype, cfg.model.path)
        if args.only_hf:
            stage.close()
            return write_report(tmp, {**base, "mode": "hf-only"}, io)
        stage("unquantized forward")
        plain_logits = io.forward(plain, probe)
        if simulate:
            stage("simulated forward")
            report = simulated_report(base, scheme, group, plain, probe, plain_logits, fake_logits, tmp, io)
            stage.close()
            return report
        stage(f"{'convert' if trained_scheme else 'PTQ'} {scheme.name}")
        quant = qat_convert(model, scheme, group, embedding) if trained_scheme else ptq(plain, scheme, group)
        q_logits = io.forward(quant, probe)
    report = {**base, "mode": "qat" if trained_scheme else "ptq", "scheme": scheme.record(group, embedding),
              "scheme_description": scheme.describe(group), "lora": cfg.lora.enabled,
              "dtype": str(dtype).replace("torch.", "")}
    if io.has_logits:
        report.update(logit_checks(q_logits, plain_logits, trained_logits, fake_logits,
                                   merged_lora=trained_scheme is not None and cfg.qat.lora_merged))
    report = io.share(report)
    check_report(report, scheme)
    stage("quantized/")
    io.save_quantized(quant, tokenizer, tmp / "quantized", quantized_config(quant, scheme, group, embedding),
                      dtype, cfg.model.path)
    if not args.no_reload_check:
        stage("reload check")
        report["reload_equal"] = io.reload_matches(quant, tmp / "quantized", probe, q_logits)
    stage.close()
    return write_report(tmp, report, io)


class Stages:
    """A tqdm bar over convert's stages, on rank 0: with a large model each takes minutes."""

    def __init__(self, total: int):
        from qat.progress import progress_bar

        self.bar = progress_bar(total, "convert", unit="stage", disable=not is_rank0())
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        self.bar.update(1)
        self.bar.close()


def logit_checks(q_logits, plain_logits, trained_logits, fake_logits, merged_lora: bool) -> dict:
    from qat.export import compare_logits

    out = {"converted_vs_unquantized": compare_logits(q_logits, plain_logits),
           "converted_vs_training_forward": compare_logits(q_logits, trained_logits)}
    if fake_logits is not None:
        out["converted_vs_fake_quant"] = compare_logits(q_logits, fake_logits)
        out["converted_equals_fake_quant"] = bool(torch.equal(q_logits, fake_logits))
    if merged_lora:  # merged-weight LoRA QAT trains exactly the function that is deployed
        out["converted_equals_training_forward"] = bool(torch.equal(q_logits, trained_logits))
    return out


def check_report(report: dict, scheme) -> None:
    """The equalities that must hold exactly; a failure here is a bug, not bad input."""
    if scheme.family != "intx":
        return
    if report.get("converted_equals_fake_quant") is False:
        raise RuntimeError(f"converted logits differ from fake-quantized logits for intx scheme "
                           f"{scheme.name}: {report['converted_vs_fake_quant']}")
    if report.get("converted_equals_training_forward") is False:
        raise RuntimeError(f"lora_merged: converted logits differ from the training forward: "
                           f"{report['converted_vs_training_forward']}")


def write_report(tmp: Path, report: dict, io) -> dict:
    """verify.json, with the peak host memory of the whole conversion (every rank's if sharded)."""
    report = {**report, **io.record()}
    if is_rank0():
        (tmp / "verify.json").write_text(json.dumps(report, indent=2))
    return report


def simulated_report(base: dict, scheme, group, plain, probe, plain_logits, fake_logits, tmp: Path, io) -> dict:
    """No real kernels: record how the fake-quantized model (what evaluate --simulate runs) compares."""
    import copy

    from qat.config import QATConfig
    from qat.export import compare_logits
    from qat.model import apply_qat

    sim = copy.deepcopy(plain)
    apply_qat(sim, QATConfig(enabled=True, scheme=scheme.name, group_size=group, backend="ours"), scheme)
    with torch.no_grad():
        sim_logits = io.forward(sim, probe)
    report = {**base, "mode": "simulated", "simulated": True, "scheme": scheme.record(group, False),
              "scheme_description": scheme.describe(group) + " (simulated: fake-quantized forward, no real kernels)"}
    if io.has_logits:
        report["simulated_vs_unquantized"] = compare_logits(sim_logits, plain_logits)
        if fake_logits is not None:
            report["simulated_equals_training_forward"] = bool(torch.equal(sim_logits, fake_logits))
    report = io.share(report)
    if is_rank0():
        (tmp / "simulated.json").write_text(json.dumps(report["scheme"], indent=2))
    return write_report(tmp, report, io)


if __name__ == "__main__":
    main()
