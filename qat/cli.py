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
        from qat.schemes import SCHEMES
        for name, s in SCHEMES.items():
            print(f"{name:20s} {s.describe(32 if s.uses_group_size else None):60s} {s.hardware}")
        return
    if cmd == "data":
        os.execv(sys.executable, [sys.executable, "-m", "qat.data", *rest])
    if cmd == "train" or (cmd == "convert" and rest[:1] == ["--nproc"]):
        nproc = "1"
        if rest[:1] == ["--nproc"]:
            nproc, rest = rest[1], rest[2:]
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node", nproc, str(RECIPES / f"{cmd}.py"), *rest])
    if cmd in ("convert", "evaluate", "compare"):
        os.execv(sys.executable, [sys.executable, str(RECIPES / f"{cmd}.py"), *rest])
    print(f"qat: unknown command {cmd!r} (train, convert, evaluate, compare, schemes, data)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
