"""Convert a training checkpoint into deployable HF folders, and verify the conversion.

    python recipes/convert.py --checkpoint runs/qat/checkpoints/step-000150 --out runs/qat/export
    python recipes/convert.py --checkpoint runs/bf16 --scheme 8da4w      # newest checkpoint, PTQ

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
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from qat import checkpoint as ckpt
from qat.atomic import atomic_dir
from qat.errors import UserError, exit_on_user_error

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
    with atomic_dir(out) as tmp:
        report = convert(path, meta, scheme, group, embedding, args, tmp, simulate)
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")


def convert(path: Path, meta: dict, scheme, group, embedding, args, tmp: Path, simulate: bool = False) -> dict:
    from transformers import AutoTokenizer

    from qat.export import (compare_logits, load_trained, ptq, qat_convert, save_quantized, unfake)

    model, cfg, meta, trained_scheme = load_trained(path)
    dtype = DTYPES[cfg.training.dtype if args.dtype == "auto" else args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, revision=cfg.model.revision,
                                              trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    probe = probe_batch(tokenizer, cfg)
    with torch.no_grad():
        trained_logits = model(probe).logits.float()
        if cfg.lora.enabled:
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model = model.to(dtype)
        fake_logits = model(probe).logits.float() if trained_scheme else None
        plain = unfake(model)
        plain.save_pretrained(tmp / "hf")
        tokenizer.save_pretrained(tmp / "hf")
        plain_logits = plain(probe).logits.float()
        if args.only_hf:
            report = {"checkpoint": str(path), "step": meta["step"], "mode": "hf-only"}
            (tmp / "verify.json").write_text(json.dumps(report, indent=2))
            return report
        if simulate:
            return simulated_report(path, meta, scheme, group, plain, probe, plain_logits, fake_logits, tmp)
        quant = qat_convert(model, scheme, group, embedding) if trained_scheme else ptq(plain, scheme, group)
        q_logits = quant(probe).logits.float()
    report = {"checkpoint": str(path), "step": meta["step"], "mode": "qat" if trained_scheme else "ptq",
              "scheme": scheme.record(group, embedding), "scheme_description": scheme.describe(group),
              "lora": cfg.lora.enabled, "dtype": str(dtype).replace("torch.", ""),
              "converted_vs_unquantized": compare_logits(q_logits, plain_logits),
              "converted_vs_training_forward": compare_logits(q_logits, trained_logits)}
    if fake_logits is not None:
        report["converted_vs_fake_quant"] = compare_logits(q_logits, fake_logits)
        exact = torch.equal(q_logits, fake_logits)
        report["converted_equals_fake_quant"] = exact
        if scheme.family == "intx" and not exact:
            raise RuntimeError(f"converted logits differ from fake-quantized logits for intx scheme "
                               f"{scheme.name}: {report['converted_vs_fake_quant']}")
    if trained_scheme is not None and cfg.qat.lora_merged and scheme.family == "intx":
        # merged-weight LoRA QAT trains exactly the function that is deployed
        report["converted_equals_training_forward"] = torch.equal(q_logits, trained_logits)
        if not report["converted_equals_training_forward"]:
            raise RuntimeError(f"lora_merged: converted logits differ from the training forward: "
                               f"{report['converted_vs_training_forward']}")
    save_quantized(quant, tokenizer, tmp / "quantized", scheme, group, embedding)
    if not args.no_reload_check:
        report["reload_equal"] = reload_matches(tmp / "quantized", probe, q_logits)
    (tmp / "verify.json").write_text(json.dumps(report, indent=2))
    return report


def simulated_report(path, meta, scheme, group, plain, probe, plain_logits, fake_logits, tmp: Path) -> dict:
    """No real kernels: record how the fake-quantized model (what evaluate --simulate runs) compares."""
    import copy

    from qat.config import QATConfig
    from qat.export import compare_logits
    from qat.model import apply_qat

    sim = copy.deepcopy(plain)
    apply_qat(sim, QATConfig(enabled=True, scheme=scheme.name, group_size=group, backend="ours"), scheme)
    with torch.no_grad():
        sim_logits = sim(probe).logits.float()
    report = {"checkpoint": str(path), "step": meta["step"], "mode": "simulated",
              "simulated": True, "scheme": scheme.record(group, False),
              "scheme_description": scheme.describe(group) + " (simulated: fake-quantized forward, no real kernels)",
              "simulated_vs_unquantized": compare_logits(sim_logits, plain_logits)}
    if fake_logits is not None:
        report["simulated_equals_training_forward"] = bool(torch.equal(sim_logits, fake_logits))
    (tmp / "simulated.json").write_text(json.dumps(report["scheme"], indent=2))
    (tmp / "verify.json").write_text(json.dumps(report, indent=2))
    return report


def reload_matches(folder: Path, probe: torch.Tensor, expected: torch.Tensor) -> bool:
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return bool(torch.equal(reloaded(probe).logits.float(), expected))


if __name__ == "__main__":
    main()
