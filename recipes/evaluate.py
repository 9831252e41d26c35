"""Evaluate a model folder with lm-eval: hellaswag (acc, acc_norm) and wikitext (perplexities).

    python recipes/evaluate.py --model runs/qat/export/step-000150/quantized --tasks hub
    python recipes/evaluate.py --model <folder> --tasks local --data-dir assets/world/eval --limit 200

--tasks hub uses the registered tasks (data from the HF hub or cache); --tasks local runs the same
built-in task logic on local files (hellaswag/{train,validation}.jsonl and
wikitext/{train,validation,test}.jsonl in the real schemas); a comma list of lm-eval task names
also works. Results go to --out (JSON) and, with --wandb, to a W&B run (job_type=eval) whose
summary holds eval/<task>/<metric>.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from qat.atomic import write_text_atomic
from qat.errors import exit_on_user_error


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model folder (hf/ or quantized/ from convert)")
    p.add_argument("--tasks", default="hub", help="hub, local, or a comma list of lm-eval task names")
    p.add_argument("--data-dir", type=Path, help="folder with the local task files (tasks=local)")
    p.add_argument("--limit", type=float, help="examples per task (int) or fraction (<1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--simulate", metavar="SCHEME",
                   help="evaluate the folder with this scheme's fake quantization (for schemes whose real "
                        "kernels are missing here); results are labelled simulated")
    p.add_argument("--group-size", type=int, default=32, help="group size for --simulate (intx schemes)")
    p.add_argument("--out", type=Path, help="results JSON (default: <model>/../eval_<model name>.json)")
    p.add_argument("--wandb", action="store_true", help="log to W&B (offline unless a key is configured)")
    p.add_argument("--name", help="W&B run name / label of this model")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    from qat.config import EvalConfig
    from qat.validation import check_fields

    check_fields(EvalConfig(tasks=args.tasks, limit=args.limit, batch_size=args.batch_size,
                            num_fewshot=args.num_fewshot, device=args.device, dtype=args.dtype), as_flags=True)
    from qat.atomic import check_target
    from qat.convert.simulated import load_simulated
    from qat.distributed import pick_device
    from qat.eval.harness import evaluate
    from qat.model import load_tokenizer

    model = Path(args.model)
    out = args.out or model.parent / f"eval_{model.name}{'_simulated' if args.simulate else ''}.json"
    check_target(out, folder=False, what="--out")  # before the evaluation, not after
    limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
    target, tokenizer = args.model, None
    if args.simulate:
        target = load_simulated(Path(args.model), args.simulate, args.group_size, args.dtype)
        tokenizer = load_tokenizer(args.model, key="--model", need_pad=True)
    results = evaluate(target, tokenizer, tasks=args.tasks, data_dir=args.data_dir, limit=limit,
                       batch_size=args.batch_size, num_fewshot=args.num_fewshot, device=str(pick_device(args.device)),
                       dtype=args.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": str(model), "tasks": args.tasks, "limit": limit, "results": results,
              "simulated": f"{args.simulate} fake-quantized forward, no real kernels" if args.simulate else None}
    write_text_atomic(out, json.dumps(record, indent=2))
    if args.wandb:
        from qat.eval.wandb_report import summary_keys
        from qat.config import WandbConfig
        from qat.loggers import init_wandb

        run = init_wandb(WandbConfig(), out.parent, {"model": str(model), "tasks": args.tasks},
                         job_type="eval", name=args.name or model.name)
        if run is not None:
            run.summary.update(summary_keys(results))
            run.finish()
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
