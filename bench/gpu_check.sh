#!/usr/bin/env bash
# The GPU check on the device machine. bench/README.md has the calls.
#
#   bash bench/gpu_check.sh prepare         # HERE, before the call: .whl/ wheels + .bench/ anchor scripts
#   bash bench/gpu_check.sh all             # ONE device call (9 min): tests, then the benchmarks, then a profile
#   bash bench/gpu_check.sh tests           # or one part per call: versions, pytest -m gpu, torchao scheme probe
#   bash bench/gpu_check.sh bench-eager     # ours next to the anchor, eager, 1B then 8B
#   bash bench/gpu_check.sh bench-compiled  # the same, compiled
#   ONLY="ours_8b_compiled anchor_8b_compiled" bash bench/gpu_check.sh bench-compiled   # rerun what was cut
#
# Each device stage installs the carried wheels into /tmp/site (skipped when a warm machine already
# has them), builds the tiny world when it is missing, and writes everything under $OUT, flat. Every
# step runs under `timeout`, capped by its own limit and by what is left of the stage's budget
# (STAGE_BUDGET_S, setup included), and is skipped when under 20 s are left; so the call ends inside
# the device tool's limit with the results so far, and what was cut or skipped is recorded in
# $OUT/<stage>.status.jsonl. A step that ends early leaves its time to the steps after it.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: bench/gpu_check.sh prepare|all|tests|bench-eager|bench-compiled}
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
# `all`: 510 s, for one device call with timeout_s 540 (9 min), leaving time to return the files.
# The separate stages: 450 s for tests, 420 s for a bench stage.
case $STAGE in
all) BUDGET=${STAGE_BUDGET_S:-510} ;;
tests) BUDGET=${STAGE_BUDGET_S:-450} ;;
*) BUDGET=${STAGE_BUDGET_S:-420} ;;
esac
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
    [ -f assets/world/world.json ] || python3 -m qat.synthetic.build --out assets/world >/dev/null || exit 2
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

# The GPU tests; -x off: every failure is information. Per-test timeout catches a hung kernel.
# -v: one line per test as it finishes, so a run cut by the budget still says what passed.
# With pytest-xdist (the device has it): two workers, one file each at a time (--dist loadfile), so
# test_gpu_runs.py's recipe launches (three waves of parallel processes, mostly CPU-bound imports)
# overlap the in-process checks of the other files on the same GPU. No test is timed, and each
# process's kernels are deterministic, so sharing the GPU changes no result.
run_pytest() {
    local par=(); python3 -c "import xdist" 2>/dev/null && par=(-n 2 --dist loadfile)
    step pytest "$1" python3 -m pytest -m gpu "${par[@]}" tests/gpu/test_gpu_runs.py tests/gpu/test_gpu_numerics.py \
        tests/gpu/test_gpu_paths.py tests/gpu/test_gpu.py -k "not flex_attention" -v -rfEs --durations=30 \
        -p no:cacheprovider --timeout 170 --junitxml="$OUT/pytest.xml"
}
# The test steps of `all` and `tests`, with their limits (s): the fake quantizers' Triton kernels
# compiled for this GPU against the CPU reference, bitwise (on the CPU these tests run in Triton's
# interpreter); the GPU tests; torchao's own QAT schemes on this GPU (prepare, train, convert,
# float8 gradient flush).
gpu_tests() {
    step triton_kernels "$1" python3 -m pytest tests/unit/test_fq_triton.py tests/unit/test_fq_triton_blocks.py -v -rfEs \
        -p no:cacheprovider \
        --timeout $(($1 * 3 / 4))
    run_pytest "$2"
    step scheme_check "$3" python3 .bench/gpu_scheme_check.py
}
# flex_attention compiles its kernels on first use: its training test runs alone, after the others
run_flex_test() {
    step pytest_flex "$1" python3 -m pytest -m gpu tests/gpu/test_gpu_runs.py -k flex_attention -v -rfEs \
        -p no:cacheprovider --timeout "$1" --junitxml="$OUT/pytest_flex.xml"
}

# ours|anchor NAME MAX SHAPE BATCH MODES eager|compiled STEPS WARMUP [KEY=VALUE...]: one bench
# step, whose JSON (every mode that finished, if the step was cut) ends up as $OUT/NAME.json. Ours
# compiles per block; the anchor compiles the whole model. Ours takes training overrides after them.
ours() {
    local flag=(); [ "$6" = compiled ] && flag=(--compile)
    local train=("${@:9}"); [ ${#train[@]} -gt 0 ] && train=(--train "${train[@]}")
    step "$1" "$2" python3 bench/bench_train.py --shape "$3" --batch "$4" --seq 2048 --modes "$5" "${flag[@]}" \
        --steps "$7" --warmup "$8" "${train[@]}" --out "$OUT/$1.d"
    collect "$1"
}
anchor() {
    local flag=(); [ "$6" = compiled ] && flag=(--compile model)
    mkdir -p "$OUT/$1.d"
    step "$1" "$2" python3 .bench/anchor_bench_gpu.py --shape "$3" --batch "$4" --seq 2048 --modes "$5" "${flag[@]}" \
        --steps "$7" --warmup "$8" --out "$OUT/$1.d"
    collect "$1"
}
collect() {  # the step's result file to $OUT/NAME.json; its folder (run folders, model configs) goes
    local f
    for f in "$OUT/$1.d"/*.json; do [ -e "$f" ] && mv "$f" "$OUT/$1.json"; done
    rm -rf "$OUT/$1.d"
}
# 1B: full and LoRA r16, each bf16 and QAT 8da4w. 8B: LoRA r16 at 2x2048 (the anchor's QAT mode
# took 81 GiB on an H200 eager: on an 80 GB H100 expect its OOM row; add --ac full to ours if needed).
M1=full-bf16,full-qat-8da4w,lora-bf16,lora-qat-8da4w
M1_FULL=full-bf16,full-qat-8da4w
M1_LORA=lora-bf16,lora-qat-8da4w
M8=lora-bf16,lora-qat-8da4w

case $STAGE in
all)
    # Limits (s), in order of priority; the stage's 510 s bound them all. Estimated needs on an H200: setup and
    # versions ~30, the Triton kernel tests ~60 (mostly compiling some 60 kernel variants), pytest ~165, scheme probe ~15, ours 1B eager ~20 per mode, the anchor 1B eager
    # ~35 for four modes, the profile ~40, a compiled mode ~40-60 each. Leftover time flows on; the
    # compiled LoRA modes and 8B run only when earlier steps ended early (then rerun with ONLY).
    setup
    versions
    gpu_tests 75 175 20
    ours ours_1b_eager 90 llama3.2-1b 4 $M1 eager 5 2
    anchor anchor_1b_eager 35 llama3.2-1b 4 $M1 eager 5 2
    step profile 40 python3 bench/profile_step.py --arms ours-full-bf16,ours-full-qat-8da4w,anchor-full-bf16 \
        --shape llama3.2-1b --batch 4 --seq 2048 --anchor .bench/anchor_bench_gpu.py --out "$OUT"
    ours ours_1b_compiled 55 llama3.2-1b 4 $M1_FULL compiled 4 2
    anchor anchor_1b_compiled 55 llama3.2-1b 4 $M1_FULL compiled 4 2
    # packed documents: the default (position ids, transformers' block-causal mask for sdpa), against
    # rows without document boundaries (as the anchor trains) and against flex_attention's block mask
    run_flex_test 60
    ours ours_1b_concat 30 llama3.2-1b 4 full-bf16 eager 5 2 data.packing=concat
    ours ours_1b_flex 45 llama3.2-1b 4 full-bf16 eager 5 2 model.attn_implementation=flex_attention
    # each fake quantizer's kernels against a copy of the same tensor (memory speed), and two tile sizes
    step fq_bandwidth 60 python3 bench/fq_bandwidth.py --elems 4096,2048 --out "$OUT"
    ours ours_1b_compiled_lora 60 llama3.2-1b 4 $M1_LORA compiled 4 2
    anchor anchor_1b_compiled_lora 60 llama3.2-1b 4 $M1_LORA compiled 4 2
    ours ours_8b_eager 60 llama3.1-8b 2 $M8 eager 4 2
    anchor anchor_8b_eager 60 llama3.1-8b 2 $M8 eager 4 2
    ;;
tests)
    setup
    versions
    gpu_tests 120 400 45
    run_flex_test 90
    ;;
bench-eager | bench-compiled)
    setup
    versions >/dev/null
    # Ours next to the anchor, in one call per execution mode, so every ratio of the bars comes from
    # one machine and one call.
    TAG=${STAGE#bench-}
    ours ours_1b_$TAG 300 llama3.2-1b 4 $M1 $TAG 8 3
    anchor anchor_1b_$TAG 300 llama3.2-1b 4 $M1 $TAG 8 3
    ours ours_8b_$TAG 300 llama3.1-8b 2 $M8 $TAG 8 3
    anchor anchor_8b_$TAG 300 llama3.1-8b 2 $M8 $TAG 8 3
    ;;
*)
    echo "error: unknown stage '$STAGE'; use prepare, all, tests, bench-eager or bench-compiled"
    exit 2
    ;;
esac
# only flat files come back: no step folder is left (collect removes each)
rm -rf "$OUT"/*.d
ls -la "$OUT"
echo "stage $STAGE done in $(($(date +%s) - START))s"
