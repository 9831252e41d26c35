"""`qat` console command: thin wrappers over the recipes, like torchtune's `tune run`.

    qat train --nproc 8 --config configs/llama3_2_1b/qat.yaml optimizer.lr=2e-5
    qat convert --checkpoint runs/x
    qat convert --nproc 4 --checkpoint runs/x    # sharded: each rank holds a slice of the model
    qat evaluate --model runs/x/export/step-000100/quantized --tasks hub
    qat compare --config configs/llama3_2_1b/compare.yaml
    qat schemes
    qat data prepare --config configs/llama3_2_1b/qat.yaml   # tokenize into the cache ahead of the job

`qat train` (and `qat convert --nproc N`) execs `torchrun --nproc_per_node N recipes/train.py ...`; plain torchrun always works too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "schemes":
        print_schemes()
        return
    if cmd == "data":
        os.execv(sys.executable, [sys.executable, "-m", "qat.data", *rest])
    if cmd in ("train", "convert", "evaluate", "compare") and not RECIPES.is_dir():
        # the recipes are scripts of the repository, not part of the installed package
        print(f"error: qat {cmd} runs recipes/{cmd}.py of a checkout of this repository, and this install has "
              f"none ({RECIPES} is missing); install with `pip install -e <checkout>` or run the script directly",
              file=sys.stderr)
        sys.exit(2)
    if cmd == "train" or (cmd == "convert" and rest[:1] == ["--nproc"]):
        nproc = "1"
        if rest[:1] == ["--nproc"]:
            if len(rest) < 2 or not rest[1].isdigit() or int(rest[1]) < 1:
                print("error: --nproc needs a number of processes per node, e.g. --nproc 8", file=sys.stderr)
                sys.exit(2)
            nproc, rest = rest[1], rest[2:]
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node", nproc, str(RECIPES / f"{cmd}.py"), *rest])
    if cmd in ("convert", "evaluate", "compare"):
        os.execv(sys.executable, [sys.executable, str(RECIPES / f"{cmd}.py"), *rest])
    print(f"error: unknown command {cmd!r}: use one of train, convert, evaluate, compare, schemes, data (qat --help)",
          file=sys.stderr)
    sys.exit(2)


def print_schemes() -> None:
    """Every registered scheme: what it is, where QAT trains it, and what convert produces."""
    from qat.schemes import SCHEMES

    rows = [(name, s.describe(32 if s.uses_group_size else None), s.hardware, s.convert_path)
            for name, s in SCHEMES.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in [("name", "what (group 32 where grouped)", "real kernels need", "convert writes"), *rows]:
        print("  ".join(f"{v:{w}s}" for v, w in zip(r[:3], widths)) + "  " + r[3])
    print("QAT trains every scheme on any hardware (qat.backend=qatlinear); see README, Schemes.")


if __name__ == "__main__":
    main()
