"""Streaming sources (`streaming: true`): read, tokenized and packed on the fly, never materialised.

    data = build_stream(cfg.data, tokenizer, log, seed)   # validates; reads nothing but the first row
    loader = StreamLoader(data, rank, world, batch_size, accum, device)
    batches = loader.next_batches()                   # this step's micro-batches
    meta["data"] = loader.state_dict()                # collective: every rank's position

The documents. Sources are read with `datasets.load_dataset(..., streaming=True)`, the same call
for local files and hub datasets. Each document gets a global index g that keeps counting across
epochs. Two orders, both pure functions of g (and the seed), so everything below is about g only:
- Without weights the sources are chained (source 0's rows, then source 1's, ...). When the chain
  ends it starts again (epoch 1, 2, ...) and g goes on: document g is row `g % N` of the chain.
- With `sources[i].weight` (DocumentMix) document g's source is drawn from (seed, g) with
  probability w_i / sum(w) (qat/data/mix.py), and it is that source's next document. Each source
  cycles on its own: its k-th document is row `k % N_i` of its epoch `k // N_i`, so a small source
  repeats and its epoch grows faster, as on the memory-mapped path (qat/data/sampler.py).
  The number of documents each source gave before g is computed, not replayed, at a resume.
Shuffle (`data.shuffle`): each source's epoch e is read through datasets'
`IterableDataset.shuffle(generator, buffer_size=data.shuffle_buffer)`, seeded by (seed, source, e):
every rank reads the same order, and a resume re-reading an epoch from its start reads it again.

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

Epochs. A stream never ends. Chained: every source's epoch is `g // N`. Mixed: source i's epoch
is (its documents before g) // N_i, and data/epoch is the smallest. The checkpoint holds the N (or
N_i) once known, to jump whole epochs on resume, and the weights, shuffle buffer and seed that
define the order: a resume with another order stops with one line.
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
from qat.data.chat import RoleRule, check_row, row_location
from qat.data.mix import BLOCK, Mixture, shares, shuffle_generator
from qat.data.packed import rows_to_batch
from qat.data.sources import (BUILDERS, _parse_problem, encode_texts, local_files, resolve_column,
                              tokenize_chat_batch)
from qat.distributed import raise_together
from qat.data.stream_state import Position, merge_positions, reshard  # noqa: F401 (re-exported)
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
        if s.max_samples is not None:
            raise UserError(f"data.sources[{i}].max_samples caps the rows of a memory-mapped source; a stream "
                            f"has no row count: use max_rows (documents) or training.steps")
    return True


@dataclasses.dataclass
class StreamData:
    """What a streaming run reads: validated sources, the tokenizer, the row shape, and the order."""
    sources: list[DataSource]
    tokenizer: object
    seq_len: int
    packing: str
    seed: int = 0  # training.seed: the mix's draws and the shuffles' seeds
    shuffle_buffer: Optional[int] = None  # None: each source in file order
    roles: dict = dataclasses.field(default_factory=dict)  # data.chat.roles
    _opened: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    _rule: Optional[RoleRule] = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def rule(self) -> RoleRule:
        """The chat roles the tokenizer takes (learned once, the same on every rank)."""
        if self._rule is None:
            self._rule = RoleRule(self.tokenizer, self.roles)
        return self._rule

    def open(self, s: int):
        """Source s's stream. load_dataset resolves the builder and the files (~0.1 s) once per source and
        thread: each epoch iterates the same object again, which datasets supports in sequence (an
        iteration resets the position it keeps inside the dataset's objects), not by two threads at once."""
        key = (threading.get_ident(), s)
        if key not in self._opened:
            self._opened[key] = _open(self.sources[s], s)
        return self._opened[key]

    @property
    def weights(self) -> Optional[list[float]]:
        return None if self.sources[0].weight is None else [s.weight for s in self.sources]

    def order_record(self) -> dict:
        """What defines the documents' order, kept in the checkpoint: a resume must match it."""
        mix = None if self.weights is None else [float(x) for x in shares(self.weights)]
        seeded = mix is not None or self.shuffle_buffer is not None
        return {"weights": mix, "shuffle_buffer": self.shuffle_buffer, "seed": self.seed if seeded else None}


def build_stream(cfg: DataConfig, tokenizer, log, seed: int = 0) -> StreamData:
    """Checks every source by opening its stream and reading its first row (bad paths, columns)."""
    data = StreamData(list(cfg.sources), tokenizer, cfg.seq_len, cfg.packing, seed,
                      cfg.shuffle_buffer if cfg.shuffle else None, dict(cfg.chat.roles))
    for i, src in enumerate(cfg.sources):
        if next(iter(_values(data, i, shuffle=False)), None) is None:
            raise UserError(f"data.sources[{i}]: {src.path} has no rows")
        log(f"sources[{i}] {src.path} streams: tokenized on the fly, nothing cached")
    if data.weights is not None:
        log(f"streams mixed by weight, source shares {data.order_record()['weights']} (seed {seed})")
    if cfg.shuffle:
        log(f"streams shuffled per source and epoch: datasets' shuffle buffer of {cfg.shuffle_buffer} "
            f"documents (seed {seed})")
    return data


def _open(src: DataSource, index: int):
    import datasets

    files = local_files(src, index)
    if files is not None and src.data_files:
        raise UserError(f"data.sources[{index}].data_files selects files of a hub dataset; "
                        f"for local files, point path at the file or folder")
    try:
        if files is not None:
            return datasets.load_dataset(BUILDERS[files[0].suffix], data_files=[str(f) for f in files],
                                         split="train", streaming=True)
        return datasets.load_dataset(src.path, src.name, split=src.split, revision=src.revision,
                                     data_files=list(src.data_files) or None, streaming=True)
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as e:
        raise UserError(f"data.sources[{index}]: {src.path} does not parse: {_parse_problem(e)}") from None


def _values(data: StreamData, index: int, epoch: int = 0, shuffle: bool = True) -> Iterator:
    """Source `index`'s column values: the first max_rows rows, in order or shuffled with the epoch's
    seed; a row the tokenizer cannot take (chat: a role it does not know) stops with one line.
    Every rank reads every row, so every rank stops at the same row."""
    import datasets

    src, ds = data.sources[index], data.open(index)
    shuffle_buffer = data.shuffle_buffer if shuffle else None
    where = f"data.sources[{index}]: {src.path}"
    if src.max_rows is not None:  # the first rows, then shuffled, as on the memory-mapped path
        ds = ds.take(src.max_rows)
    if shuffle_buffer is not None:
        ds = ds.shuffle(generator=shuffle_generator(data.seed, index, epoch), buffer_size=shuffle_buffer)
    n, column = 0, None
    try:
        for row in ds:
            column = column or resolve_column(src, row)
            if column not in row:
                raise UserError(f"{where} has no column {column!r} (columns: {', '.join(row)})")
            v = row[column]
            if v is None:
                raise UserError(f"{where}: column {column!r} is null at {_row_name(n, shuffle_buffer, epoch)}; "
                                f"remove or fill it")
            if (src.kind == "text") != isinstance(v, str) or (src.kind == "chat" and not isinstance(v, list)):
                raise UserError(f"{where}: column {column!r} holds {type(v).__name__} at "
                                f"{_row_name(n, shuffle_buffer, epoch)}, not "
                                f"{'text' if src.kind == 'text' else 'conversations'}")
            if src.kind == "chat":
                check_row(v, data.rule, lambda: f"data.sources[{index}]: {_where(src, index, n, shuffle_buffer, epoch)}")
            yield v
            n += 1
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as e:
        raise UserError(f"{where} does not parse: {_parse_problem(e)}") from None


def _row_name(n: int, shuffle_buffer: Optional[int], epoch: int) -> str:
    if shuffle_buffer is None:
        return f"row {n} (line {n + 1} of a JSON-lines file)"
    return f"row {n} of epoch {epoch}'s shuffle (data.shuffle=false gives its line)"


def _where(src: DataSource, index: int, n: int, shuffle_buffer: Optional[int], epoch: int) -> str:
    """Row n of a source read in file order: its file and line (or row); in a shuffle, its place there."""
    files = local_files(src, index) if shuffle_buffer is None else None
    if files is not None:
        return row_location(files, n)
    return f"{src.path} {_row_name(n, shuffle_buffer, epoch)}"


def epoch_values(data: StreamData, s: int, epoch: int) -> Iterator:
    """Source s's documents in its epoch `epoch`: in file order, or that epoch's shuffle."""
    return _values(data, s, epoch)


class DocumentChain:
    """(g, source index, value) for g >= start: the sources chained, epoch after epoch."""

    def __init__(self, data: StreamData, docs_per_epoch: Optional[int] = None):
        self.data, self.docs_per_epoch = data, docs_per_epoch
        self.period = docs_per_epoch  # documents per epoch, once known (a bound for RankStream's check)

    def rows_from(self, start: int) -> Iterator[tuple[int, int, object]]:
        g = 0
        if self.docs_per_epoch:  # jump whole epochs without reading them
            g = start // self.docs_per_epoch * self.docs_per_epoch
        while True:
            first = g
            epoch = g // self.docs_per_epoch if self.docs_per_epoch else 0
            for s in range(len(self.data.sources)):
                for v in epoch_values(self.data, s, epoch):
                    if g >= start:
                        yield g, s, v
                    g += 1
            if g == first:
                raise UserError("data.sources yield no rows")
            self.docs_per_epoch = self.period = g - first
            if start > g:
                g += (start - g) // self.docs_per_epoch * self.docs_per_epoch

    def epochs(self, g: int) -> list[int]:
        e = g // self.docs_per_epoch if self.docs_per_epoch else 0
        return [e] * len(self.data.sources)


class DocumentMix:
    """(g, source index, value) for g >= start: document g is the next document of the source the
    mixture draws for g; each source cycles through its own epochs."""

    def __init__(self, data: StreamData, docs_per_epoch: Optional[list] = None):
        self.data, self.mixture = data, Mixture(data.weights, data.seed)
        self.docs_per_epoch = list(docs_per_epoch or [None] * len(data.sources))  # N_i once known
        self.period = None

    def rows_from(self, start: int) -> Iterator[tuple[int, int, object]]:
        cursors = [self._cycle(s, int(k)) for s, k in enumerate(self.mixture.counts_before(start))]
        g = start
        while True:
            block = self.mixture.block(g // BLOCK)
            for i in range(g % BLOCK, BLOCK):
                s = int(block[i])
                yield g, s, next(cursors[s])
                g += 1

    def _cycle(self, s: int, k: int) -> Iterator:
        """Source s's documents from its k-th on: row k % N of epoch k // N, N learned at the first end."""
        n = self.docs_per_epoch[s]
        epoch, skip = divmod(k, n) if n else (0, k)
        while True:
            n = 0
            for v in epoch_values(self.data, s, epoch):
                if n >= skip:
                    yield v
                n += 1
            if n == 0:
                raise UserError(f"data.sources[{s}] ({self.data.sources[s].path}) yields no rows")
            self.docs_per_epoch[s] = n
            skip = max(skip - n, 0)
            epoch, skip = epoch + 1 + skip // n, skip % n  # a resume before N was known jumps here

    def epochs(self, g: int) -> list[int]:
        counts = self.mixture.counts_before(g)
        return [int(c) // n if n else 0 for c, n in zip(counts, self.docs_per_epoch)]


def document_order(data: StreamData, docs_per_epoch=None):
    """The chain, or the mix when the sources have weights (docs_per_epoch: an int, or a list per source)."""
    if data.weights is None:
        return DocumentChain(data, docs_per_epoch)
    return DocumentMix(data, docs_per_epoch)


@dataclasses.dataclass
class Row:
    tokens: np.ndarray
    flags: np.ndarray
    after: Position  # the rank's position once this row is used
    docs: tuple  # the global indices of the documents in this row (tests, debugging)


class RankStream:
    """One rank's rows: its documents, tokenized in batches and packed like the memory-mapped path."""

    def __init__(self, data: StreamData, rank: int, world: int, start: Position, skip: frozenset,
                 docs_per_epoch=None):
        self.data, self.rank, self.world, self.start, self.skip = data, rank, world, start, skip
        self.order = document_order(data, docs_per_epoch)
        self.pad = _PadWriter(data.seq_len, data.tokenizer)

    def _mine(self) -> Iterator[tuple[int, int, object]]:
        last = self.start.g
        for g, s, v in self.order.rows_from(self.start.g):
            if g % self.world == self.rank and g not in self.skip:
                last = g
                yield g, s, v
            elif self.order.period and g - last > self.order.period + self.world:
                raise UserError(f"data.sources hold {self.order.period} documents per epoch, none of "
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
                enc = tokenize_chat_batch({"x": values}, "x", self.data.tokenizer, self.data.roles)
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


def check_order(state: dict, data: StreamData) -> None:
    """One line if the checkpoint's documents came in another order than this config's (a checkpoint
    written before streams had weights or a shuffle has none of these keys: chained, in order)."""
    saved, want = {k: state.get(k) for k in ("weights", "shuffle_buffer", "seed")}, data.order_record()
    if saved["weights"] != want["weights"]:
        def say(w):
            return "chained (no weight)" if w is None else f"mixed by weight, shares {w}"
        raise UserError(f"the checkpoint's streams were {say(saved['weights'])}, this config's are "
                        f"{say(want['weights'])}: set data.sources[i].weight as the checkpoint had, or start a new run")
    if saved["shuffle_buffer"] != want["shuffle_buffer"]:
        def say(b):
            return "read in file order (data.shuffle=false)" if b is None else f"shuffled with data.shuffle_buffer={b}"
        raise UserError(f"the checkpoint's streams were {say(saved['shuffle_buffer'])}, this config's are "
                        f"{say(want['shuffle_buffer'])}: set data.shuffle and data.shuffle_buffer as the "
                        f"checkpoint had, or start a new run")
    if saved["seed"] != want["seed"]:
        raise UserError(f"the checkpoint mixed or shuffled its streams with training.seed={saved['seed']}, "
                        f"this config has {want['seed']}: resume with training.seed={saved['seed']}")


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
        check_order(state, self.data)
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
        """This step's micro-batches. Collective: a bad row stops every rank at the same step with
        its line, whichever rank's thread read it first (rank 0 would otherwise wait in the step)."""
        try:
            out, error = self._batches(), None
        except UserError as e:
            out, error = None, e
        raise_together(error, self.device)
        return out

    def _batches(self) -> list:
        out = []
        for _ in range(self.accum):
            rows = [self.next_row() for _ in range(self.batch_size)]
            batch = rows_to_batch(np.stack([r.tokens for r in rows]), np.stack([r.flags for r in rows]),
                                  self.data.packing)
            out.append(tuple(t.to(self.device, non_blocking=True) if t is not None else None for t in batch))
        return out

    def _order(self):
        """The thread's document order (what it has learned of the epochs' lengths), or the checkpoint's."""
        if self._thread is not None:
            return self._stream.order
        return document_order(self.data, self.docs_per_epoch)

    def epochs(self) -> dict[str, int]:
        per = self._order().epochs(self.position.g)
        return {"data/epoch": min(per), **{f"data/epoch/{i}": e for i, e in enumerate(per)}}

    def state_dict(self) -> dict:
        """Collective: every rank's position, gathered."""
        import torch.distributed as dist

        positions = [self.position]
        if dist.is_initialized() and self.world > 1:
            positions = [None] * self.world
            dist.all_gather_object(positions, self.position)
        n = self._order().docs_per_epoch
        return merge_positions(positions, self.world, self.skip, list(n) if isinstance(n, list) else n,
                               self.data.order_record())

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
