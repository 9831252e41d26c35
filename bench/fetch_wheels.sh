#!/usr/bin/env bash
# Download the wheels that the device machine lacks into .whl/ (git-ignored), for Python 3.12 on
# x86-64. The device has torch 2.11 (CUDA 13), transformers 5.17, accelerate 1.15, pyarrow, xxhash,
# pandas, requests, tokenizers and huggingface_hub, but no torchao, datasets, omegaconf, lm-eval or
# wandb, and no registry. bench/gpu_check.sh installs these with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# so every package the code imports and the device lacks is named here, one version each.
# bench/README.md lists them with their sizes and says why each one is here.
#
#   bash bench/fetch_wheels.sh          # -> .whl/, about 15.4 MiB; the working tree must stay under 64 MiB
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    torchao==0.18.0          # QAT prepare/convert; its C++ ops are built for another torch and are not used
    peft==0.21.2             # the device's peft version is unknown; this is the one CI tests
    omegaconf==2.4.0         # typed config (needs only PyYAML, which the device has)
    datasets==5.2.0          # data loading (qat/data.py) and lm-eval's task loading
    dill==0.4.1              # datasets: <0.4.2
    multiprocess==0.70.19    # datasets: <0.70.20 (py312 wheel)
    fsspec==2026.9.0         # datasets: <=2026.9.0 (the device's own fsspec may be newer)
    lm_eval==0.4.13          # evaluate: hellaswag / wikitext task logic on local files
    evaluate==0.4.6          # lm-eval's metric registry
    # `python -m lm_eval` prints its results table with pytablewriter; these are its dependencies
    pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5
    tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 pytz==2026.6
)
# Not carried, on purpose: wandb (imported only when logging.wandb.enabled and WANDB_MODE is not
# "disabled"; gpu_check.sh disables it), lm-eval's dependencies for tasks we do not run (rouge-score,
# sqlitedict, word2number: imported lazily by those tasks), and mslk-cuda (42 MiB; see bench/README.md).
# WITH_MSLK=1 adds mslk-cuda (42 MiB, ~58 MiB in all: close to the limit): torchao's `plain` int4
# and fp8-int4 packings need it. Whether its binary loads with the device's torch 2.11+cu130 is
# what that call finds out (tests/gpu/test_gpu.py skips the fp8-int4 check without it).
if [ "${WITH_MSLK:-0}" = 1 ]; then WHEELS+=(mslk-cuda==1.1.0); fi

rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -l .whl
du -ch .whl/*.whl | tail -1
