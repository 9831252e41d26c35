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
  quantized/   real quantized weights. QAT runs: the checkpoint's own scheme through torchao's
               QATConfig(step="convert"). bf16 runs: --scheme as post-training quantization.
               AutoModelForCausalLM.from_pretrained(quantized/) loads it.
  gguf/        with --gguf (schemes q4_0, q8_0): model-<scheme>.gguf for llama.cpp, the trained (or
               PTQ) codes; a bf16 run also gets model-<dtype>.gguf, unquantized. docs/gguf.md
  model.pte    --formats pte: quantized/ as an ExecuTorch program for phones (XNNPACK kernels), with
               a KV-cache `forward` and a whole-window `window` method, run in ExecuTorch's
               runtime against quantized/ (verify.json "pte"). Needs ExecuTorch (docs/executorch.md).
  verify.json  on a fixed probe batch: converted vs fake-quantized logits (exact for intx
               schemes: asserted), converted vs the unquantized model (relative error, top-1
               agreement), and the reloaded quantized folder vs the in-memory one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # before torch's seconds of imports: a torchrun worker dies with torchrun
    from qat.lifeline import exit_with_launcher

    exit_with_launcher()

from qat.errors import exit_on_user_error, is_rank0


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
    p.add_argument("--gguf", choices=["f16", "f32"], default=None,
                   help="also write gguf/ for llama.cpp (schemes q4_0, q8_0), with norms, embeddings and the "
                        "output head in this dtype (needs the gguf package: pip install '.[gguf]')")
    p.add_argument("--formats", default="", help="extra formats from quantized/, comma separated: pte "
                                                 "(ExecuTorch .pte lowered to XNNPACK; schemes: 8da4w)")
    p.add_argument("--no-reload-check", action="store_true", help="skip reloading quantized/ to compare logits")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    from qat.convert import make_plan, run_convert

    a = parse_args(argv)
    plan = make_plan(a.checkpoint, out=a.out, scheme=a.scheme, group_size=a.group_size, per_channel=a.per_channel,
                     dtype=a.dtype, simulate=a.simulate, only_hf=a.only_hf, reload_check=not a.no_reload_check,
                     gguf=a.gguf, formats=tuple(f for f in a.formats.split(",") if f))
    report = run_convert(plan)
    if is_rank0():
        print(json.dumps(report, indent=2))
        print(f"wrote {plan.out}")


if __name__ == "__main__":
    main()
