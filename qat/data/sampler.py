"""Which rows each optimizer step takes: a pure function of the seed and the position in the stream.

Every step takes the next `global_batch` row indices; rank r / micro-step m take a fixed slice
of them (`micro_batches`). So the samples of a step do not depend on the world size, and the
position saved in a checkpoint resumes the stream exactly, at any world size.

Epochs:
- Without weights (`StepSampler`) the sources are one concatenated dataset: an epoch is one
  pass over a seeded permutation of all rows, and its ragged tail (fewer rows than a global
  batch) is dropped. Every source is at the same epoch.
- With `sources[i].weight` (`MixSampler`) each source has its own permutation and its own
  epoch: the k-th sample of the run goes to the source furthest behind its share (the
  deterministic "blending" schedule of Megatron-LM), so after k samples source i has
  contributed round(k * w_i / sum(w)) rows, up to one. A source that is small for its weight
  is repeated (its epoch grows faster); a large one is not exhausted. The position is the
  number of rows drawn from each source, which determines everything else.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import numpy as np
import torch

from qat.errors import UserError


def _check_batch(global_batch: int, num_samples: int) -> None:
    if global_batch > num_samples:
        raise UserError(f"the global batch ({global_batch} sequences = batch_size x world size x "
                        f"gradient_accumulation_steps) is larger than the dataset ({num_samples} sequences)")


def _permutation(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g) if shuffle else torch.arange(n)


@dataclasses.dataclass
class DataPosition:
    """Where the sample stream stands; saved in every checkpoint."""
    epoch: int = 0
    offset: int = 0


class StepSampler:
    """Global-batch sampler over the concatenation of all sources."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, shuffle: bool, num_sources: int = 1):
        _check_batch(global_batch, num_samples)
        self.n, self.global_batch, self.seed, self.shuffle = num_samples, global_batch, seed, shuffle
        self.num_sources = num_sources
        self.pos = DataPosition()
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = _permutation(self.n, self.seed, epoch, self.shuffle), epoch
        return self._perm

    def next_step(self) -> torch.Tensor:
        """The global batch of the next step; drops an epoch's ragged tail."""
        if self.pos.offset + self.global_batch > self.n:
            self.pos = DataPosition(self.pos.epoch + 1, 0)
        idx = self._permutation(self.pos.epoch)[self.pos.offset : self.pos.offset + self.global_batch]
        self.pos = DataPosition(self.pos.epoch, self.pos.offset + self.global_batch)
        return idx

    def epochs(self) -> dict[str, int]:
        return {"data/epoch": self.pos.epoch, **{f"data/epoch/{i}": self.pos.epoch for i in range(self.num_sources)}}

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.pos)

    def load_state_dict(self, state: dict) -> None:
        if "counts" in state:
            raise UserError("the checkpoint sampled data.sources by weight; this config sets no weights: "
                            "restore the sources' weights to resume")
        self.pos = DataPosition(**state)


class MixSampler:
    """Global-batch sampler drawing from each source in proportion to its weight."""

    def __init__(self, sizes: list[int], weights: list[float], global_batch: int, seed: int, shuffle: bool):
        _check_batch(global_batch, sum(sizes))
        self.sizes, self.global_batch, self.seed, self.shuffle = sizes, global_batch, seed, shuffle
        self.share = np.asarray(weights, np.float64) / float(np.sum(weights))
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.counts = [0] * len(sizes)  # rows drawn from each source so far
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}

    def _row(self, s: int) -> int:
        epoch, offset = divmod(self.counts[s], self.sizes[s])
        if self._perms.get(s, (None,))[0] != epoch:
            # source s's own seed stream; its permutations do not depend on the other sources
            self._perms[s] = (epoch, _permutation(self.sizes[s], self.seed * 7919 + s, epoch, self.shuffle))
        return int(self.offsets[s]) + int(self._perms[s][1][offset])

    def next_step(self) -> torch.Tensor:
        out = []
        for _ in range(self.global_batch):
            k = sum(self.counts) + 1
            s = int(np.argmax(self.share * k - np.asarray(self.counts)))  # furthest behind; ties: lowest
            out.append(self._row(s))
            self.counts[s] += 1
        return torch.tensor(out, dtype=torch.long)

    def epochs(self) -> dict[str, int]:
        per = [c // n for c, n in zip(self.counts, self.sizes)]
        return {"data/epoch": min(per), **{f"data/epoch/{i}": e for i, e in enumerate(per)}}

    def state_dict(self) -> dict:
        return {"counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if "counts" not in state or len(state["counts"]) != len(self.sizes):
            raise UserError(f"the checkpoint's data position {state} does not match {len(self.sizes)} weighted "
                            f"sources: resume with the data.sources (and weights) it was trained with")
        self.counts = list(state["counts"])


def build_sampler(sizes: list[int], weights: list[Optional[float]], global_batch: int, seed: int, shuffle: bool):
    if all(w is None for w in weights):
        return StepSampler(sum(sizes), global_batch, seed, shuffle, num_sources=len(sizes))
    return MixSampler(sizes, weights, global_batch, seed, shuffle)


def micro_batches(global_idx: torch.Tensor, rank: int, world: int, accum: int) -> Iterator[torch.Tensor]:
    """Split one step's global indices: rank r owns a contiguous slice, cut into `accum` micro-batches."""
    per_rank = len(global_idx) // world
    mine = global_idx[rank * per_rank : (rank + 1) * per_rank]
    per_micro = per_rank // accum
    for m in range(accum):
        yield mine[m * per_micro : (m + 1) * per_micro]
