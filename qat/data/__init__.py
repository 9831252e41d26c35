"""Data: sources tokenized once into an on-disk cache, memory-mapped, packed, sampled by global step.

    data = build_dataset(cfg.data, tokenizer)        # builds missing cache entries, maps them
    loader = build_loader(data, cfg.data, cfg.training, device, rank, world)   # the training loop's view
    sampler = build_sampler(data.sizes, weights, global_batch, seed, shuffle)
    ids, labels, position_ids = data.batch(idx)       # rows read by index from the memory map

Sources with `streaming: true` are read, tokenized and packed on the fly instead (qat/data/stream.py).
Ahead of a GPU job, on a CPU node: `python -m qat.data prepare --config X` (or `qat data prepare`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

from qat.config import DataConfig
from qat.data.loader import MemmapLoader, Prefetcher
from qat.data.cache import build_source, default_cache_dir, entry_dir, entry_key, open_entry, tokenizer_fingerprint
from qat.data.packed import PackedData, SourceRows, describe_use, document_positions, flash_varlen_kwargs, usage
from qat.data.sampler import DataPosition, MixSampler, StepSampler, build_sampler, micro_batches
from qat.data.stream import StreamData, StreamLoader, build_stream, check_streaming
from qat.data.sources import IGNORE, load_source, source_identity, tokenize_chat, tokenize_text, usable_cpus
from qat.distributed import shared_run_id
from qat.errors import UserError, is_rank0

__all__ = ["IGNORE", "DataPosition", "MemmapLoader", "Prefetcher", "MixSampler", "PackedData", "StepSampler",
           "StreamData", "StreamLoader", "build_dataset", "build_loader", "build_sampler", "flash_varlen_kwargs",
           "document_positions", "load_source", "micro_batches", "source_identity", "tokenize_chat", "tokenize_text"]


def is_builder() -> bool:
    """One builder per node: local rank 0 (a plain `python` run is its own builder)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _log(msg: str) -> None:
    print(f"data: {msg}", file=sys.stderr, flush=True)


def build_dataset(cfg: DataConfig, tokenizer, builder: Optional[bool] = None,
                  log: Callable[[str], None] = _log, seed: int = 0, run_id: Optional[str] = None) -> PackedData | StreamData:
    """Every source's cache entry (built if missing, by this node's builder), mapped as rows; or,
    for streaming sources, their checked description (qat/data/stream.py). `seed` (training.seed)
    orders streams: their mix by weight and their shuffles; the memory-mapped sampler gets it later.
    `run_id`, the same on every rank of a run, lets the waiting ranks raise a failed build's line
    (default: one drawn by rank 0 when a process group is up).
    Rank 0's builder logs one line per source: the rows used, and why others were not."""
    if check_streaming(cfg):
        return build_stream(cfg, tokenizer, log, seed)
    run_id = run_id or shared_run_id()
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    builder = is_builder() if builder is None else builder
    layout = "pad" if cfg.packing == "pad" else "stream"
    tok_hash = tokenizer_fingerprint(tokenizer)
    num_proc = cfg.num_proc or min(usable_cpus(), 32)  # each worker holds a tokenizer and a batch
    rows = []
    roles = dict(cfg.chat.roles)
    for i, src in enumerate(cfg.sources):
        key = entry_key(src, i, tok_hash, layout, cfg.seq_len, roles)
        entry = entry_dir(cache_dir, src, key)

        def build(tmp, src=src, i=i):
            return build_source(tmp, src, i, tokenizer, layout, cfg.seq_len, num_proc, roles)

        manifest = open_entry(entry, key, build, builder, log=lambda m, i=i: log(f"sources[{i}] {m}"),
                              run_id=run_id)
        r = SourceRows(entry, manifest, cfg.seq_len, src.max_samples)
        if builder and is_rank0():
            log(f"sources[{i}] {src.path}: {describe_use(usage(r, manifest, src), src, cfg.seq_len, layout)}")
        if r.num_rows == 0:
            raise UserError(f"data.sources[{i}] ({src.path}) yields no sequence of seq_len={cfg.seq_len}")
        rows.append(r)
    return PackedData(rows, cfg.seq_len, cfg.packing)


def build_loader(data: PackedData | StreamData, cfg: DataConfig, training, device, rank: int, world: int):
    """What the training loop draws batches from: next_batches(), epochs(), state_dict(), close()."""
    b, accum = training.batch_size, training.gradient_accumulation_steps
    if isinstance(data, StreamData):
        return StreamLoader(data, rank, world, b, accum, device)
    sampler = build_sampler(data.sizes, [s.weight for s in cfg.sources], b * world * accum, training.seed,
                            cfg.shuffle)
    return MemmapLoader(data, sampler, device, rank, world, accum)
