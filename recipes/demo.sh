#!/usr/bin/env bash
# make demo: the whole bf16 vs PTQ vs QAT vs QAD experiment on the tiny offline world, 2 CPU processes.
#   1. generate the world (corpus, tokenizer, eval sets, tiny Llama)   -> assets/world
#   2. pretrain the tiny base model                                      -> runs/demo/pretrain, runs/demo/base/hf
#   3. compare: fine-tune bf16, QAT and QAD arms, convert, evaluate, report -> runs/demo/compare/report.md
# Every stage skips work that is already done, so rerunning after an interruption resumes.
# Extra arguments are key=value overrides of configs/tiny/compare.yaml; PRETRAIN_OVERRIDES holds
# overrides of configs/tiny/pretrain.yaml (the tests use both to run a reduced demo).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
read -r -a pretrain_overrides <<< "${PRETRAIN_OVERRIDES:-}"

[ -f assets/world/world.json ] || $PY -m qat.synthetic.build --out assets/world
echo "== pretrain the tiny base model"
# the stage is done once its base model is converted (delete runs/demo/base to pretrain again)
if [ ! -f runs/demo/base/verify.json ]; then
    $PY -m torch.distributed.run --standalone --nproc_per_node 2 recipes/train.py \
        --config configs/tiny/pretrain.yaml "${pretrain_overrides[@]}"
    $PY recipes/convert.py --checkpoint runs/demo/pretrain --out runs/demo/base --only-hf >/dev/null
fi
echo "== compare bf16 / PTQ / QAT / QAD"
$PY recipes/compare.py --config configs/tiny/compare.yaml "$@"
