#!/usr/bin/env bash
# make demo: the whole bf16 vs PTQ vs QAT experiment on the tiny offline world, 2 CPU processes.
# Every stage skips work that is already done, so rerunning after an interruption resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

[ -f assets/world/world.json ] || $PY -m qat.world.build --out assets/world
echo "== pretrain the tiny base model"
$PY -m torch.distributed.run --standalone --nproc_per_node 2 recipes/train.py --config configs/tiny/pretrain.yaml
[ -f runs/demo/base/verify.json ] || $PY recipes/convert.py --checkpoint runs/demo/pretrain --out runs/demo/base --only-hf >/dev/null
echo "== compare bf16 / PTQ / QAT"
$PY recipes/compare.py --config configs/tiny/compare.yaml "$@"
