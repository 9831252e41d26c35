# Cluster settings sourced by every job script in slurm/. Edit this file for your cluster:
# modules, the Python environment, NCCL and network variables. Keep it idempotent.

# module load cuda/12.8 nccl          # e.g. on an Lmod cluster
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PY=${PY:-$REPO/.venv/bin/python}     # the venv that `make venv` created (or your own)

# NCCL / network. Typical InfiniBand settings; uncomment what your admins recommend.
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
# Offline compute nodes: read models and datasets from the HF cache only.
# export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# W&B is offline unless a key is configured; upload later with `wandb sync`.
# export WANDB_API_KEY=...

# GPUs per node used by torchrun; the sbatch header asks for the same number.
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
RDZV_PORT=${RDZV_PORT:-29500}
