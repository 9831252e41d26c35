#!/usr/bin/env bash
# Peak host memory of convert: one process vs torchrun slices, on a 16-block random model
# (hidden 1024, ~300M parameters, 1.2 GB in fp32) that a 2-step QAT run checkpoints first.
#   bash bench/convert_memory.sh [out_dir]      # needs `make world`; CPU only; ~5 minutes
set -euo pipefail
OUT=${1:-runs/convert_memory}
PY=${PY:-.venv/bin/python}
W=assets/world
export OMP_NUM_THREADS=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
mkdir -p "$OUT/model"
cp $W/model/tokenizer.json $W/model/tokenizer_config.json $W/model/chat_template.jinja "$OUT/model/"
$PY - "$OUT/model" <<'PY'
import json, sys
cfg = json.load(open("assets/world/model/config.json"))
cfg.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
           num_key_value_heads=4, head_dim=64, vocab_size=32768)
json.dump(cfg, open(f"{sys.argv[1]}/config.json", "w"), indent=2)
PY
$PY -m torch.distributed.run --nproc_per_node 2 recipes/train.py --config configs/tiny/full.yaml \
  output_dir="$OUT/run" model.path="$OUT/model" model.init=random \
  "data.sources=[{path: $W/data/finetune.jsonl, kind: chat}]" data.seq_len=64 training.dtype=bf16 \
  fsdp.device=cpu training.steps=2 training.batch_size=2 logging.progress_bar=false \
  logging.wandb.enabled=false qat.enabled=true qat.scheme=8da4w qat.group_size=32 > "$OUT/train.log" 2>&1
for n in 1 2 4; do
  if [ $n = 1 ]; then launch=($PY); else launch=($PY -m torch.distributed.run --nproc_per_node $n); fi
  "${launch[@]}" recipes/convert.py --checkpoint "$OUT/run" --out "$OUT/export-$n" > "$OUT/convert-$n.log" 2>&1
  $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'process(es):',
r.get('memory') or r['sharded']['peak_rss_mib_per_rank'], 'MiB peak RSS;',
'converted_equals_fake_quant', r['converted_equals_fake_quant'], 'reload_equal', r['reload_equal'])" \
    "$OUT/export-$n/verify.json" $n
done
$PY - "$OUT" <<'PY'
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
def tensors(folder):
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()}
for sub in ("hf", "quantized"):
    ref = tensors(out / "export-1" / sub)
    for n in (2, 4):
        other = tensors(out / f"export-{n}" / sub)
        same = set(ref) == set(other) and all(torch.equal(ref[k], other[k]) for k in ref)
        print(f"{sub}/ from {n} processes equals one process, bit for bit: {same}")
PY
