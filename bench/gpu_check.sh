#!/usr/bin/env bash
# The whole GPU check, one stage per device call. bench/README.md has the calls.
#
#   bash bench/gpu_check.sh prepare         # HERE, before the calls: .whl/ wheels + .bench/ anchor scripts
#   bash bench/gpu_check.sh tests           # device call 1: versions, pytest -m gpu, torchao scheme probe
#   bash bench/gpu_check.sh bench-eager     # device call 2: ours next to the anchor, eager, 1B then 8B
#   bash bench/gpu_check.sh bench-compiled  # device call 3: the same, compiled
#   ONLY="ours_8b_compiled anchor_8b_compiled" bash bench/gpu_check.sh bench-compiled   # rerun what was cut
#
# Each device stage installs the carried wheels into /tmp/site (skipped when a warm machine already
# has them), builds the tiny world when it is missing, and writes everything under $OUT, flat:
# a stage's JSON results plus one log, never more than 8 files. Every step runs under `timeout`
# against the stage's deadline (STAGE_BUDGET_S: 450 s for tests, 420 s for a bench stage, setup
# included), so the call ends inside the device tool's 10-minute limit with the results so far,
# and what was skipped for time is recorded in $OUT/<stage>.status.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: bench/gpu_check.sh prepare|tests|bench-eager|bench-compiled}
ROOT=$PWD
SHARED_BENCH=${SHARED_BENCH:-$ROOT/../shared/bench}

prepare() {
    bash bench/fetch_wheels.sh
    mkdir -p .bench
    cp "$SHARED_BENCH/anchor_bench_gpu.py" "$SHARED_BENCH/gpu_scheme_check.py" .bench/
    du -sh .whl .bench
    echo "carry: [\".whl\", \".bench\"]   (the working tree, these included, must stay under 64 MiB)"
}

if [ "$STAGE" = prepare ]; then prepare; exit; fi

OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
LOG=$OUT/$STAGE.log
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
# Default budgets fit three calls into a session's 30 device minutes, with ~2.5 min per call
# for the machine's start, the transfers and the 30 s it stays warm afterwards.
if [ "$STAGE" = tests ]; then BUDGET=${STAGE_BUDGET_S:-450}; else BUDGET=${STAGE_BUDGET_S:-420}; fi
STATUS=$OUT/$STAGE.status.jsonl   # one line per step: name, rc, seconds (124 = cut by the deadline)

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME MAX_S CMD...: run CMD under min(MAX_S, time left); skip it when under 20 s are left,
# or when ONLY (a space-separated list of step names) is set and does not name it.
step() {
    local name=$1 max=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    local l; l=$(left)
    local t=$((l < max ? l : max)) t0; t0=$(date +%s)
    if [ "$t" -lt 20 ]; then
        echo "== $name: skipped, ${l}s left of the stage budget"
        echo "{\"step\": \"$name\", \"skipped\": true, \"left_s\": $l}" >>"$STATUS"
        return 0
    fi
    echo "== $name (limit ${t}s)"
    timeout --kill-after=10 "$t" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        # torchrun workers run in sessions of their own and outlive a killed launcher: free the GPU
        # for the next step (this bare machine runs nothing but this script's processes).
        nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9
    fi
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" >>"$STATUS"
    echo "== $name: rc=$rc after $(($(date +%s) - t0))s"
}

setup() {
    if [ ! -f /tmp/site/.installed ]; then
        [ -d .whl ] || { echo "error: .whl/ is missing: run 'bash bench/gpu_check.sh prepare' here and carry .whl"; exit 2; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && touch /tmp/site/.installed || exit 2
    fi
    # the project itself, as `make` installs it here (qat, and eval/ as qat.eval), from this checkout
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site-qat . \
        >/dev/null || { echo "error: cannot install the project (pip install --target /tmp/site-qat .)"; exit 2; }
    export PYTHONPATH=/tmp/site-qat:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    [ -f assets/world/world.json ] || python3 -m qat.world.build --out assets/world >/dev/null || exit 2
}

versions() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    python3 - <<'EOF' >"$OUT/env.json"
import importlib.metadata as md, json, platform, torch
names = ["torch", "torchao", "transformers", "peft", "accelerate", "datasets", "lm_eval", "omegaconf",
         "tokenizers", "huggingface_hub", "safetensors", "fsspec", "numpy", "triton"]
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return None
gpu = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(0) if gpu else None,
                  "capability": torch.cuda.get_device_capability(0) if gpu else None,
                  "packages": {n: version(n) for n in names}}, indent=1))
EOF
    cat "$OUT/env.json"
}

case $STAGE in
tests)
    setup
    versions
    # the fake quantizers' Triton kernels compiled for this GPU against the CPU reference, bitwise
    # (on the CPU these tests run in Triton's interpreter)
    # (results in the log: $OUT holds at most 8 files)
    step triton_kernels 90 python3 -m pytest tests/unit/test_fq_triton.py -v -rfEs -p no:cacheprovider --timeout 60
    # the GPU tests; -x off: every failure is information. Per-test timeout catches a hung kernel.
    # -v: one line per test as it finishes, so a run cut by the budget still says what passed.
    # test_gpu_numerics.py and test_gpu_paths.py first: unit-sized checks before test_gpu.py's recipe runs.
    step pytest 400 python3 -m pytest -m gpu tests/gpu/test_gpu_numerics.py tests/gpu/test_gpu_paths.py tests/gpu/test_gpu.py -v -rfEs --durations=15 -p no:cacheprovider \
        --timeout 300 --junitxml="$OUT/pytest.xml"
    # torchao's own QAT schemes on this GPU (prepare, train, convert, float8 gradient flush)
    step scheme_check 45 python3 .bench/gpu_scheme_check.py
    ;;
bench-eager | bench-compiled)
    setup
    versions >/dev/null
    # Ours next to the anchor, in one call per execution mode, so every ratio of the bars comes from
    # one machine and one call. 1B: the modes the bars need (LoRA QAT at 1B is in no bar).
    M1=full-bf16,full-qat-8da4w,lora-bf16
    M8=lora-bf16,lora-qat-8da4w
    if [ "$STAGE" = bench-eager ]; then
        OURS=(); ANCHOR=(); TAG=eager
    else
        OURS=(--compile); ANCHOR=(--compile model); TAG=compiled
    fi
    step ours_1b_$TAG 300 python3 bench/bench_train.py --shape llama3.2-1b --batch 4 --seq 2048 --modes $M1 "${OURS[@]}" --out "$OUT"
    step anchor_1b_$TAG 300 python3 .bench/anchor_bench_gpu.py --shape llama3.2-1b --batch 4 --modes $M1 "${ANCHOR[@]}" --out "$OUT"
    # 8B LoRA r16 at 2x2048. The anchor's QAT mode took 81 GiB on an H200 (eager): on an 80 GB H100
    # expect its OOM row. Ours keeps no fake-quantized copies; add --ac full if it does not fit.
    step ours_8b_$TAG 300 python3 bench/bench_train.py --shape llama3.1-8b --batch 2 --seq 2048 --modes $M8 "${OURS[@]}" --out "$OUT"
    step anchor_8b_$TAG 300 python3 .bench/anchor_bench_gpu.py --shape llama3.1-8b --batch 2 --modes $M8 "${ANCHOR[@]}" --out "$OUT"
    ;;
*)
    echo "error: unknown stage '$STAGE'; use prepare, tests, bench-eager or bench-compiled"
    exit 2
    ;;
esac
# bench_train.py leaves its run folders under $OUT: only flat files come back, and at most 8.
rm -rf "$OUT"/run-* "$OUT"/model-*
ls -la "$OUT"
echo "stage $STAGE done in $(($(date +%s) - START))s"
