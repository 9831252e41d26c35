"""Per-step random state: a pure function of (seed, step, rank), so a resume needs no RNG blobs."""

from __future__ import annotations

import torch


def rng_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch (and every CUDA device) for this step on this rank: dropout, LoRA dropout."""
    s = rng_seed(seed, step, rank)
    torch.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(s)
