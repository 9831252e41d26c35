"""Streaming sources (`streaming: true`): read, tokenized and packed on the fly, never materialised.

    data = build_stream(cfg.data, tokenizer)          # validates; reads nothing but the first row
    loader = StreamLoader(data, rank, world, batch_size, accum, device)
    batches = loader.next_batches()                   # this step's micro-batches
    meta["data"] = loader.state_dict()                # collective: every rank's position

The documents. The sources are chained (source 0's rows, then source 1's, ...) and read with
`datasets.load_dataset(..., streaming=True)`, the same call for local files and hub datasets. Each
document gets a global index g that keeps counting across epochs: when the chain ends, it starts
again (epoch 1, 2, ...) and g goes on, so the document at g is row `g % N` of the chain, N its length.

Sharding. Rank r of a world W owns the documents with `g % W == r` (minus a skip set, below). It
tokenizes and packs only those, in a background thread that keeps a bounded queue of rows ahead of
the step. Every rank reads the rows it does not own (parsing, no tokenizing): a stream has no index.

Position. A rank's position is (g, offset): the next document it looks at is the first one it owns
at or after g, and `offset` tokens of document g are already in earlier rows (the packer's
carry-over, described by where it came from instead of by its tokens). Each row carries the
position after it, so the position saved is the one after the last row a step used, never a row
the thread read ahead. The checkpoint holds every rank's position, the world size, N once known,
and the skip set.

Resume at the same world size: each rank restores its own position; the rows, and so the losses,
are bitwise those of a run that did not stop.

Resume at another world size (the rule). Documents consumed so far are: for each old rank r, the
ones it owns below its g_r, and g_r itself when its offset is > 0 (a document cut by a row end
counts as consumed; its rest is dropped). Let F = min_r g_r: every document below F is consumed.
The new ranks all start at F with offset 0 and skip the consumed documents at or above F (the skip
set; at most the spread between the ranks' positions). So no document is read twice, and none is
left out except the rests of the W cut documents. The skip set is kept until the ranks pass it,
so the rule composes over several changes of world size.

Epochs. A stream never ends: its epoch e is `g // N` (logged as data/epoch). Streams are read in
order; `data.shuffle` applies to the memory-mapped path only (shuffle the files beforehand).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterator, Optional

import numpy as np
import torch

from qat.config import DataConfig, DataSource
from qat.data.cache import DOC_START, SUPERVISED, _PadWriter
from qat.data.packed import rows_to_batch
from qat.data.sources import (BUILDERS, _parse_problem, default_column, encode_texts, local_files,
                              tokenize_chat_batch)
from qat.errors import UserError

TOKENIZE_DOCS = 64  # documents per tokenizer call: amortises the call, bounds the first row's wait


def check_streaming(cfg: DataConfig) -> bool:
    """True if the sources stream; one line for every combination the stream cannot honour."""
    flags = [s.streaming for s in cfg.sources]
    if not any(flags):
        return False
    if not all(flags):
        i = flags.index(False) if flags[0] else flags.index(True)
        raise UserError(f"data.sources[{i}].streaming={flags[i]} but data.sources[0].streaming={flags[0]}: "
                        f"stream every source or none (a stream has no length to mix by)")
    for i, s in enumerate(cfg.sources):
        if s.weight is not None:
            raise UserError(f"data.sources[{i}].weight is not supported with streaming: the sources are "
                            f"chained; remove weight, or set streaming=false to mix by weight")
        if s.max_samples is not None:
            raise UserError(f"data.sources[{i}].max_samples caps the rows of a memory-mapped source; a stream "
                            f"has no row count: use max_rows (documents) or training.steps")
    return True


@dataclasses.dataclass
class StreamData:
    """What a streaming run reads: validated sources, the tokenizer, the row shape."""
    sources: list[DataSource]
    tokenizer: object
    seq_len: int
    packing: str


def build_stream(cfg: DataConfig, tokenizer, log) -> StreamData:
    """Checks every source by opening its stream and reading its first row (bad paths, columns)."""
    for i, src in enumerate(cfg.sources):
        if next(iter(_values(src, i)), None) is None:
            raise UserError(f"data.sources[{i}]: {src.path} has no rows")
        log(f"sources[{i}] {src.path} streams: tokenized on the fly, nothing cached")
    if cfg.shuffle:
        log("streams are read in order: data.shuffle applies to memory-mapped sources only")
    return StreamData(list(cfg.sources), tokenizer, cfg.seq_len, cfg.packing)


def _open(src: DataSource, index: int):
    import datasets

    files = local_files(src, index)
    if files is not None and src.data_files:
        raise UserError(f"data.sources[{index}].data_files selects files of a hub dataset; "
                        f"for local files, point path at the file or folder")
    if files is not None:
        return datasets.load_dataset(BUILDERS[files[0].suffix], data_files=[str(f) for f in files],
                                     split="train", streaming=True)
    return datasets.load_dataset(src.path, src.name, split=src.split, revision=src.revision,
                                 data_files=list(src.data_files) or None, streaming=True)


def _values(src: DataSource, index: int) -> Iterator:
    """The column's values, in order, up to max_rows; a row the tokenizer cannot take stops with one line."""
    import datasets

    column, where = default_column(src), f"data.sources[{index}]: {src.path}"
    n = 0
    try:
        for row in _open(src, index):
            if column not in row:
                raise UserError(f"{where} has no column {column!r} (columns: {', '.join(row)})")
            v = row[column]
            if v is None:
                raise UserError(f"{where}: row {n} of column {column!r} is null (line {n + 1} of a "
                                f"JSON-lines file); remove or fill it")
            if (src.kind == "text") != isinstance(v, str) or (src.kind == "chat" and not isinstance(v, list)):
                raise UserError(f"{where}: column {column!r} holds {type(v).__name__} at row {n}, not "
                                f"{'text' if src.kind == 'text' else 'conversations'}")
            yield v
            n += 1
            if src.max_rows is not None and n >= src.max_rows:
                return
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as e:
        raise UserError(f"{where} does not parse: {_parse_problem(e)}") from None


class DocumentChain:
    """(g, source index, value) for g >= start: the sources chained, epoch after epoch."""

    def __init__(self, sources: list[DataSource], docs_per_epoch: Optional[int] = None):
        self.sources, self.docs_per_epoch = sources, docs_per_epoch

    def rows_from(self, start: int) -> Iterator[tuple[int, int, object]]:
        g = 0
        if self.docs_per_epoch:  # jump whole epochs without reading them
            g = start // self.docs_per_epoch * self.docs_per_epoch
        while True:
            first = g
            for s, src in enumerate(self.sources):
                for v in _values(src, s):
                    if g >= start:
                        yield g, s, v
                    g += 1
            if g == first:
                raise UserError("data.sources yield no rows")
            self.docs_per_epoch = g - first
            if start > g:
                g += (start - g) // self.docs_per_epoch * self.docs_per_epoch


@dataclasses.dataclass(frozen=True)
class Position:
    """The next document a rank looks at (the first it owns at or after g) and the tokens of g already used."""
    g: int = 0
    offset: int = 0


@dataclasses.dataclass
class Row:
    tokens: np.ndarray
    flags: np.ndarray
    after: Position  # the rank's position once this row is used
    docs: tuple  # the global indices of the documents in this row (tests, debugging)


class RankStream:
    """One rank's rows: its documents, tokenized in batches and packed like the memory-mapped path."""

    def __init__(self, data: StreamData, rank: int, world: int, start: Position, skip: frozenset,
                 docs_per_epoch: Optional[int] = None):
        self.data, self.rank, self.world, self.start, self.skip = data, rank, world, start, skip
        self.chain = DocumentChain(data.sources, docs_per_epoch)
        self.pad = _PadWriter(data.seq_len, data.tokenizer)

    def _mine(self) -> Iterator[tuple[int, int, object]]:
        last = self.start.g
        for g, s, v in self.chain.rows_from(self.start.g):
            if g % self.world == self.rank and g not in self.skip:
                last = g
                yield g, s, v
            elif self.chain.docs_per_epoch and g - last > self.chain.docs_per_epoch + self.world:
                raise UserError(f"data.sources hold {self.chain.docs_per_epoch} documents per epoch, none of "
                                f"them for rank {self.rank} of {self.world}: use more data or fewer ranks")

    def documents(self) -> Iterator[tuple[int, np.ndarray, Optional[np.ndarray]]]:
        """(g, token ids, supervised flags or None) of this rank's documents, from its start."""
        batch: list = []
        for item in self._mine():
            batch.append(item)
            if len(batch) == TOKENIZE_DOCS:
                yield from self._tokenize(batch)
                batch = []

    def _tokenize(self, batch):
        """The batch tokenized per source kind, given back in g order."""
        out: dict[int, tuple] = {}
        for s in sorted({s for _, s, _ in batch}):
            part = [(g, v) for g, t, v in batch if t == s]
            values = [v for _, v in part]
            if self.data.sources[s].kind == "text":
                flat, lengths = encode_texts(values, self.data.tokenizer)
                docs = [(ids.astype(np.int64), None) for ids in np.split(flat, np.cumsum(lengths)[:-1])]
            else:
                enc = tokenize_chat_batch({"x": values}, "x", self.data.tokenizer)
                docs = [(np.asarray(i, np.int64), np.asarray(m, np.uint8)) for i, m in zip(enc["ids"], enc["sup"])]
            for (g, _), (ids, sup) in zip(part, docs):
                out[g] = (g, ids, sup)
        return [out[g] for g, _, _ in batch]

    def rows(self) -> Iterator[Row]:
        docs = self.documents()
        return self._pad_rows(docs) if self.data.packing == "pad" else self._packed_rows(docs)

    def _pad_rows(self, docs) -> Iterator[Row]:
        for g, ids, sup in docs:
            tokens, flags = self.pad.convert(ids, sup, np.array([len(ids)]))
            yield Row(tokens, flags, Position(g + 1, 0), (g,))

    def _packed_rows(self, docs) -> Iterator[Row]:
        """Documents back to back, cut every seq_len: the memory-mapped path's rows, built incrementally."""
        L = self.data.seq_len
        tok, flg, got, members = np.empty(L, np.int64), np.empty(L, np.uint8), 0, []
        for g, ids, sup in docs:
            flags = np.full(len(ids), SUPERVISED, np.uint8) if sup is None else sup & SUPERVISED
            if len(ids):
                flags[0] |= DOC_START
            off = self.start.offset if g == self.start.g else 0
            while off < len(ids):
                take = min(L - got, len(ids) - off)
                tok[got:got + take], flg[got:got + take] = ids[off:off + take], flags[off:off + take]
                got, off = got + take, off + take
                members.append(g)
                if got == L:
                    after = Position(g, off) if off < len(ids) else Position(g + 1, 0)
                    yield Row(tok, flg, after, tuple(dict.fromkeys(members)))
                    tok, flg, got, members = np.empty(L, np.int64), np.empty(L, np.uint8), 0, []


def reshard(state: dict, rank: int, world: int) -> tuple[Position, frozenset]:
    """This rank's start position and skip set from a checkpoint's stream state (the rule above)."""
    old_world, positions = state["world"], [Position(*p) for p in state["positions"]]
    skip = set(state["skip"])
    if old_world == world:
        return positions[rank], frozenset(skip)
    frontier = min(p.g for p in positions)
    consumed = {g for g in skip if g >= frontier}
    for r, p in enumerate(positions):
        first = frontier + (r - frontier) % old_world  # rank r's first document at or above the frontier
        consumed.update(range(first, p.g, old_world))
        if p.offset > 0:
            consumed.add(p.g)  # cut by a row end: counts as consumed, its rest is dropped
    return Position(frontier, 0), frozenset(consumed)


def merge_positions(positions: list[Position], world: int, skip: frozenset, docs_per_epoch: Optional[int]) -> dict:
    """The checkpoint's stream state; skip entries every rank has passed are dropped."""
    frontier = min(p.g for p in positions)
    return {"stream": True, "world": world, "positions": [[p.g, p.offset] for p in positions],
            "skip": sorted(g for g in skip if g >= frontier), "docs_per_epoch": docs_per_epoch}


class StreamLoader:
    """A rank's batches from a background thread that reads, tokenizes and packs ahead into a bounded queue."""

    def __init__(self, data: StreamData, rank: int, world: int, batch_size: int, accum: int,
                 device: torch.device, ahead_steps: int = 2):
        self.data, self.rank, self.world = data, rank, world
        self.batch_size, self.accum, self.device = batch_size, accum, device
        self.ahead = max(8, ahead_steps * batch_size * accum)
        self.position, self.skip, self.docs_per_epoch = Position(), frozenset(), None
        self._thread: Optional[threading.Thread] = None

    def load_state_dict(self, state: dict) -> None:
        if not state.get("stream"):
            raise UserError("the checkpoint read memory-mapped data.sources; this config streams them: "
                            "resume with streaming=false, or start a new run")
        self.position, self.skip = reshard(state, self.rank, self.world)
        self.docs_per_epoch = state.get("docs_per_epoch")

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.ahead)
        self._stop = threading.Event()
        self._stream = RankStream(self.data, self.rank, self.world, self.position, self.skip, self.docs_per_epoch)
        self._thread = threading.Thread(target=self._produce, name="qat-stream", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for row in self._stream.rows():
                while not self._stop.is_set():
                    try:
                        self._queue.put(row, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # re-raised in the training thread, which owns the exit
            self._queue.put(e)

    def next_row(self) -> Row:
        if self._thread is None:
            self._start()
        row = self._queue.get()
        if isinstance(row, BaseException):
            raise row
        self.position = row.after
        return row

    def next_batches(self) -> list:
        out = []
        for _ in range(self.accum):
            rows = [self.next_row() for _ in range(self.batch_size)]
            batch = rows_to_batch(np.stack([r.tokens for r in rows]), np.stack([r.flags for r in rows]),
                                  self.data.packing)
            out.append(tuple(t.to(self.device, non_blocking=True) if t is not None else None for t in batch))
        return out

    def epochs(self) -> dict[str, int]:
        n = self._stream.chain.docs_per_epoch if self._thread is not None else self.docs_per_epoch
        e = self.position.g // n if n else 0
        return {"data/epoch": e, **{f"data/epoch/{i}": e for i in range(len(self.data.sources))}}

    def state_dict(self) -> dict:
        """Collective: every rank's position, gathered."""
        import torch.distributed as dist

        positions = [self.position]
        if dist.is_initialized() and self.world > 1:
            positions = [None] * self.world
            dist.all_gather_object(positions, self.position)
        n = self._stream.chain.docs_per_epoch if self._thread is not None else self.docs_per_epoch
        return merge_positions(positions, self.world, self.skip, n)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
