"""Counter-based randomness for streams: which source each document comes from, and each epoch's shuffle seed.

With `sources[i].weight` set on streaming sources, document g's source is drawn with probability
w_i / sum(w), from nothing but (training.seed, g). The draws come in blocks of BLOCK documents;
block b uses a numpy Generator seeded by (seed, b). It first draws how many of its documents
each source gets (a multinomial), then their order (a uniform permutation of that multiset).
Together this is exactly BLOCK independent categorical draws, and it makes the number of
documents each source gave before g computable without state: one multinomial per earlier block
(about 50 us each: g = 1e9 is 15k blocks, about a second), plus a count inside g's block.

numpy keeps a seeded Generator's stream fixed within a version, not across all versions: resume
a run with the numpy it started with for a bitwise continuation (the memory-mapped sampler's
torch.randperm has the same caveat).
"""

from __future__ import annotations

import threading

import numpy as np

BLOCK = 1 << 16  # documents per draw: a permutation of 64k costs ~1 ms per 64k documents streamed
_MIX, _SHUFFLE = 0, 1  # keep the two uses of the seed apart


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def shuffle_generator(seed: int, source: int, epoch: int) -> np.random.Generator:
    """The generator of source `source`'s shuffle in its epoch `epoch`: the same on every rank and every resume."""
    return _rng(seed, _SHUFFLE, source, epoch)


def shares(weights: list[float]) -> np.ndarray:
    """Each source's probability, w_i / sum(w): what the draws use and what a checkpoint records."""
    w = np.asarray(weights, np.float64)
    return w / w.sum()


class Mixture:
    """The source of every document g, and how many documents each source gave before g."""

    def __init__(self, weights: list[float], seed: int):
        self.shares, self.seed = shares(weights), seed
        self._prefix = [np.zeros(len(self.shares), np.int64)]  # documents per source before block b
        self._block: tuple = (-1, None)
        self._lock = threading.Lock()  # the loader's metrics and the stream's thread share one Mixture

    def _draw(self, b: int, order: bool) -> np.ndarray:
        rng = _rng(self.seed, _MIX, b)
        counts = rng.multinomial(BLOCK, self.shares)
        if not order:
            return counts
        return rng.permutation(np.repeat(np.arange(len(counts), dtype=np.int32), counts))

    def block(self, b: int) -> np.ndarray:
        """The sources of documents b * BLOCK ... (b + 1) * BLOCK - 1."""
        cached = self._block
        if cached[0] != b:
            cached = (b, self._draw(b, order=True))
            self._block = cached  # one assignment: a reader sees the old pair or the new one
        return cached[1]

    def counts_before(self, g: int) -> np.ndarray:
        """Documents each source gave to documents 0 .. g - 1."""
        b, i = divmod(g, BLOCK)
        with self._lock:
            while len(self._prefix) <= b:
                self._prefix.append(self._prefix[-1] + self._draw(len(self._prefix) - 1, order=False))
            base = self._prefix[b]
        return base + np.bincount(self.block(b)[:i], minlength=len(self.shares))
