"""The tokenized cache: each source tokenized once, stored flat on disk, memory-mapped by every rank.

An entry is a folder `<cache_dir>/<source>-<kind>-<layout>-<key>/` holding
- `tokens.bin`: every token of the source, documents one after another (uint16 or uint32);
- `flags.bin`: one byte per token, bit 0 = carries a loss, bit 1 = first token of a document;
- `manifest.json`, written last: the key's inputs, the sizes and an xxh3 checksum of both files.

The key hashes everything that changes those bytes: the source's identity (files: path, size,
mtime; hub: name, config, revision, split), kind, column, max_rows, the tokenizer's full content
(vocabulary, merges, normalizer, post-processor, special tokens) and its chat template, the role
mapping of chat sources (data.chat.roles), and the layout. The "stream" layout (packing documents
and concat) does not depend on seq_len: rows are cut when the entry is opened, so changing seq_len
or switching between those two packings tokenizes nothing. The "pad" layout (one sample per row) stores padded rows and keys on seq_len.

Concurrency: the builder of a node (LOCAL_RANK 0) takes an exclusive flock on `<entry>.lock`,
checks the entry and (re)builds it in a temporary folder renamed into place; every other rank
takes a shared lock, and polls until the entry checks out. Every rank verifies sizes and
checksum before it maps the files (one sequential read; the page cache is shared), so no rank
ever uses a half-written or corrupt entry, and a corrupt one is rebuilt by the builder. A build
that stops on bad input (a row with an unknown role) leaves `<entry>.error.json`, its line and the
run's id: the waiting ranks of that run raise the same line instead of waiting on. On a
filesystem shared by several nodes the node builders serialize on the same lock: the first one
builds, the others find the entry complete. The lock needs flock support across nodes (NFSv4,
Lustre mounted with -o flock); otherwise point data.cache_dir at node-local disk.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from qat.atomic import atomic_dir
from qat.config import DataSource
from qat.data.chat import RoleRule, first_refused, row_location
from qat.data.sources import (default_column, load_source, local_files, source_identity, tokenize_chat_batch,
                              tokenize_text_arrow)
from qat.errors import UserError

FORMAT = 1
SUPERVISED, DOC_START = 1, 2
FILES = ("tokens.bin", "flags.bin")


def default_cache_dir() -> Path:
    return Path(os.environ.get("QAT_DATA_CACHE") or Path.home() / ".cache" / "qat-recipes" / "data").expanduser()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what the tokenizer does to text, not of where it was loaded from."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id,
                         tokenizer.chat_template]).encode())
    return h.hexdigest()


def entry_key(src: DataSource, index: int, tokenizer_hash: str, layout: str, seq_len: int,
              chat_roles: Optional[dict] = None) -> dict:
    key = {"format": FORMAT, "source": source_identity(src, index), "kind": src.kind,
           "column": default_column(src), "max_rows": src.max_rows, "tokenizer": tokenizer_hash,
           "layout": layout, "seq_len": seq_len if layout == "pad" else None}
    if src.kind == "chat":  # a renamed role renders, and trains, differently
        key["chat_roles"] = dict(sorted((chat_roles or {}).items()))
    return json.loads(json.dumps(key))  # the form it takes in manifest.json (tuples become lists)


def entry_dir(cache_dir: Path, src: DataSource, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(src.path.rstrip("/")).stem)[:40] or "source"
    return cache_dir / f"{stem}-{src.kind}-{key['layout']}-{digest}"


def checksum(path: Path) -> str:
    import xxhash  # a dependency of datasets

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:  # read(), not mmap: the pages do not count in this process's RSS
        for chunk in iter(functools.partial(f.read, 1 << 23), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(entry: Path, key: dict) -> Optional[dict]:
    """The manifest of a complete, intact entry built for `key`, or None."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        if manifest["key"] != key:
            return None
        for name in FILES:
            f, want = entry / name, manifest["files"][name]
            if not f.is_file() or f.stat().st_size != want["size"] or checksum(f) != want["xxh3"]:
                return None
    except (KeyError, TypeError):  # a manifest of another shape: not ours, rebuild
        return None
    return manifest


def open_entry(entry: Path, key: dict, build: Callable[[Path], dict], builder: bool,
               log: Callable[[str], None], poll_s: float = 0.5, run_id: Optional[str] = None) -> dict:
    """The manifest of a verified entry; the builder builds it if missing or corrupt, the others wait.
    A build that raises a UserError leaves its line for the waiting ranks of the same run (run_id)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    failed = entry.with_name(entry.name + ".error.json")
    with open(entry.with_name(entry.name + ".lock"), "a+") as lock:
        if builder:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                manifest = read_manifest(entry, key)
                if manifest is not None:
                    log(f"cache hit {entry} ({manifest['num_tokens']:,} tokens): nothing to tokenize")
                    return manifest
                if entry.exists():
                    log(f"cache entry {entry} is incomplete or corrupt: rebuilding it")
                for stale in entry.parent.glob(f".{entry.name}-*"):  # a build killed mid-way
                    shutil.rmtree(stale, ignore_errors=True)
                failed.unlink(missing_ok=True)
                try:
                    return _build_atomically(entry, key, build, log)
                except UserError as e:
                    if run_id is not None:  # only the ranks of a run wait on this build
                        _write_failure(failed, key, run_id, str(e))
                    raise
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        while True:
            fcntl.flock(lock, fcntl.LOCK_SH)  # blocks while the builder holds the exclusive lock
            try:
                manifest = read_manifest(entry, key)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
            if manifest is not None:
                return manifest
            _raise_failure(failed, key, run_id)
            time.sleep(poll_s)


def _write_failure(path: Path, key: dict, run_id: Optional[str], line: str) -> None:
    tmp = path.with_name(f".{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "run": run_id, "error": line}))
    os.replace(tmp, path)


def _raise_failure(path: Path, key: dict, run_id: Optional[str]) -> None:
    """The builder's UserError, on a waiting rank of the same run (a record of another run is old)."""
    if run_id is None:
        return
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(record, dict) and record.get("run") == run_id and record.get("key") == key:
        raise UserError(record["error"])


def _build_atomically(entry: Path, key: dict, build: Callable[[Path], dict], log) -> dict:
    """Build into a temporary sibling folder that replaces `entry` only once its manifest is written."""
    import datasets  # noqa: F401  imported before the clock starts (about 1 s): tokens/s is the build's own

    with atomic_dir(entry, "the data cache entry") as tmp:
        t0 = time.perf_counter()
        stats = build(tmp)
        seconds = time.perf_counter() - t0
        files = {}
        for name in FILES:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = {"size": (tmp / name).stat().st_size, "xxh3": checksum(tmp / name)}
        manifest = {"key": key, "files": files, "build_seconds": round(seconds, 3),
                    "tokens_per_second": round(stats["num_tokens"] / max(seconds, 1e-9)), **stats}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: marks completeness
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    log(f"built {entry}: {stats['num_tokens']:,} tokens from {stats['num_docs']:,} documents in "
        f"{seconds:.1f} s ({manifest['tokens_per_second']:,} tokens/s)")
    return manifest


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


def build_source(tmp: Path, src: DataSource, index: int, tokenizer, layout: str, seq_len: int,
                 num_proc: int, chat_roles: Optional[dict] = None) -> dict:
    """Tokenize one source with `datasets.map` (batched, num_proc) into tokens.bin/flags.bin under tmp."""
    import datasets

    ds, column = load_source(src, index, cache_dir=str(tmp / "hf"))
    rows_in_source = len(ds)
    if src.max_rows is not None:
        ds = ds.select(range(min(src.max_rows, len(ds))))
    if src.kind == "text":  # Arrow in, Arrow out: no Python list per token on either side
        ds, fn = ds.with_format("arrow"), tokenize_text_arrow
    else:
        check_roles(ds, column, src, index, RoleRule(tokenizer, chat_roles or {}))
        fn = functools.partial(tokenize_chat_batch, roles=chat_roles or {})
    features = {"ids": datasets.List(datasets.Value("int32"))}
    if src.kind == "chat":
        features["sup"] = datasets.List(datasets.Value("uint8"))
    # Worker processes pay a start-up; below ~1,000 rows per worker they cost more than they save.
    procs = max(1, min(num_proc, len(ds) // 1000))
    if procs > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers; silence the warning
    mapped = ds.map(functools.partial(fn, column=column, tokenizer=tokenizer), batched=True,
                    num_proc=procs if procs > 1 else None, remove_columns=ds.column_names,
                    features=datasets.Features(features), cache_file_name=str(tmp / "map.arrow"),
                    new_fingerprint=f"qat-{index}-{time.time_ns()}",
                    desc=f"tokenize data.sources[{index}]")
    files = [f["filename"] for f in mapped.cache_files]
    writer = _PadWriter(seq_len, tokenizer) if layout == "pad" else _StreamWriter()
    dtype = token_dtype(tokenizer)
    with open(tmp / "tokens.bin", "wb") as tok_f, open(tmp / "flags.bin", "wb") as flag_f:
        for ids, sup, lengths in _read_batches(files):
            tokens, flags = writer.convert(ids, sup, lengths)
            tok_f.write(tokens.astype(dtype, copy=False).tobytes())
            flag_f.write(flags.tobytes())
    del mapped, ds
    shutil.rmtree(tmp / "hf", ignore_errors=True)
    for f in files:
        Path(f).unlink(missing_ok=True)
    return {"num_tokens": writer.num_tokens, "num_docs": writer.num_docs, "dtype": dtype.name,
            "truncated_docs": writer.truncated, "rows_in_source": rows_in_source, "empty_docs": writer.empty,
            "no_loss_docs": writer.no_loss if src.kind == "chat" else 0}


def check_roles(ds, column: str, src: DataSource, index: int, rule: RoleRule) -> None:
    """Every message's role of the rows to tokenize (the first len(ds), after max_rows), in Arrow."""
    found = first_refused(ds.data.slice(0, len(ds)), column, rule)
    if found is None:
        return
    row, raw = found
    files = local_files(src, index)
    where = row_location(files, row) if files is not None else f"{src.path} (split {src.split}) row {row} (0-based)"
    raise UserError(rule.refusal(f"data.sources[{index}]: {where}", raw))


def _read_batches(files: list[str]):
    """(token ids, supervised flags or None, document lengths) per Arrow record batch, read as a
    stream (not memory-mapped) so that the builder's memory stays flat in the corpus size."""
    import pyarrow as pa

    for name in files:
        with pa.OSFile(name) as f:
            for batch in pa.ipc.open_stream(f):
                ids_col = batch.column("ids")
                offsets = ids_col.offsets.to_numpy()
                lengths = np.diff(offsets)
                ids = ids_col.flatten().to_numpy()
                sup = batch.column("sup").flatten().to_numpy() if "sup" in batch.schema.names else None
                yield ids, sup, lengths


def _docs_without_loss(flags: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> int:
    """Documents none of whose tokens carries a loss (empty ones included)."""
    done = np.concatenate([[0], np.cumsum(flags & SUPERVISED, dtype=np.int64)])
    return int((done[starts + lengths] == done[starts]).sum())


class _StreamWriter:
    """Documents back to back; a flag marks each document's first token."""

    def __init__(self):
        self.num_tokens = self.num_docs = self.truncated = self.empty = self.no_loss = 0

    def convert(self, ids, sup, lengths):
        flags = np.full(len(ids), SUPERVISED, np.uint8) if sup is None else sup.astype(np.uint8) & SUPERVISED
        starts = np.cumsum(lengths) - lengths
        self.no_loss += _docs_without_loss(flags, starts, lengths)
        flags[starts[lengths > 0]] |= DOC_START
        self.num_tokens += len(ids)
        self.num_docs += len(lengths)
        self.empty += int((lengths == 0).sum())
        return ids, flags


class _PadWriter:
    """One document per row of seq_len, truncated or padded (padding carries no loss)."""

    def __init__(self, seq_len: int, tokenizer):
        self.seq_len = seq_len
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = pad or 0
        self.num_tokens = self.num_docs = self.truncated = self.empty = self.no_loss = 0

    def convert(self, ids, sup, lengths):
        n, L = len(lengths), self.seq_len
        tokens = np.full((n, L), self.pad, np.int64)
        flags = np.zeros((n, L), np.uint8)
        starts = np.cumsum(lengths) - lengths
        for r, (s, ln) in enumerate(zip(starts, lengths)):
            k = min(ln, L)
            tokens[r, :k] = ids[s : s + k]
            flags[r, :k] = SUPERVISED if sup is None else sup[s : s + k] & SUPERVISED
        self.no_loss += int((~(flags & SUPERVISED).any(axis=1)).sum())  # what is left after truncation
        flags[:, 0] |= DOC_START
        self.empty += int((lengths == 0).sum())
        self.truncated += int((lengths > L).sum())
        self.num_tokens += n * L
        self.num_docs += n
        return tokens.ravel(), flags.ravel()
