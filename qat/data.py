"""Datasets through HF `datasets`, packed into fixed-length sequences, sampled by global step.

Two kinds of source:
- text: a plain-text column (C4-like), each document followed by EOS, packed to `seq_len`;
- chat: a `messages` column rendered with the tokenizer's chat template; only assistant tokens
  carry a loss.

Sampling is a pure function of (seed, epoch, offset): every optimizer step takes the next
`global_batch` indices of a per-epoch permutation, and rank r / micro-step m take a fixed slice
of them. So the samples of a step do not depend on the world size, and the position
(epoch, offset) in a checkpoint resumes the stream exactly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import torch

from qat.config import DataConfig, DataSource
from qat.errors import UserError

IGNORE = -100
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in BUILDERS or Path(path).exists()


def load_source(src: DataSource, index: int):
    """A `datasets.Dataset` from a local file/folder or a hub dataset name (same code path)."""
    import datasets

    where = f"data.sources[{index}]"
    if _looks_local(src.path):
        p = Path(src.path).expanduser()
        if not p.exists():
            raise UserError(f"{where}.path: no such file or folder: {src.path}")
        files = sorted(str(f) for f in p.iterdir() if f.suffix in BUILDERS) if p.is_dir() else [str(p)]
        if not files:
            raise UserError(f"{where}.path: no .json/.jsonl/.parquet/.csv files in {src.path}")
        builder = BUILDERS.get(Path(files[0]).suffix)
        if builder is None:
            raise UserError(f"{where}.path: unsupported file type {Path(files[0]).suffix!r} ({', '.join(BUILDERS)})")
        ds = datasets.load_dataset(builder, data_files=files, split="train")
    else:
        ds = datasets.load_dataset(src.path, src.name, split=src.split)
    column = src.column or ("text" if src.kind == "text" else "messages")
    if column not in ds.column_names:
        raise UserError(f"{where}: {src.path} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    return ds, column


def tokenize_text(texts: list[str], tokenizer) -> list[tuple[list[int], list[int]]]:
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]:
        ids = list(ids) + ([eos] if eos is not None else [])
        out.append((ids, ids))
    return out


def _assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of each assistant reply.

    Works for any template with the prefix property: the rendering of the first k turns is a
    prefix of the full rendering. The span of assistant turn i runs from the end of the
    rendering of turns < i plus the generation prompt, to the end of the rendering of turns <= i.
    """
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], gen=True)), len(render(messages[: i + 1]))
        if not full.startswith(render(messages[: i + 1])):
            raise UserError("the tokenizer's chat template does not render conversations "
                            "prefix-consistently; cannot locate assistant tokens")
        spans.append((start, end))
    return full, spans


def tokenize_chat(conversations: list[list[dict]], tokenizer) -> list[tuple[list[int], list[int]]]:
    if tokenizer.chat_template is None:
        raise UserError("data kind 'chat' needs a tokenizer with a chat template")
    out = []
    for messages in conversations:
        text, spans = _assistant_spans(messages, tokenizer)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        labels = [tok if any(s <= a < e for s, e in spans) else IGNORE
                  for tok, (a, _) in zip(enc["input_ids"], enc["offset_mapping"])]
        out.append((list(enc["input_ids"]), labels))
    return out


def pack(seqs: list[tuple[list[int], list[int]]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate sequences and cut them into [N, seq_len] rows (the ragged tail is dropped)."""
    ids = [t for s, _ in seqs for t in s]
    labels = [t for _, l in seqs for t in l]
    n = len(ids) // seq_len
    ids_t = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    lab_t = torch.tensor(labels[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return ids_t, lab_t


def build_dataset(cfg: DataConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """All sources tokenized, packed and concatenated: (input_ids, labels), both [N, seq_len]."""
    all_ids, all_labels = [], []
    for i, src in enumerate(cfg.sources):
        ds, column = load_source(src, i)
        if src.max_rows is not None:
            ds = ds.select(range(min(src.max_rows, len(ds))))
        rows = list(ds[column])
        seqs = tokenize_text(rows, tokenizer) if src.kind == "text" else tokenize_chat(rows, tokenizer)
        ids, labels = pack(seqs, cfg.seq_len)
        if src.max_samples is not None:
            ids, labels = ids[: src.max_samples], labels[: src.max_samples]
        if len(ids) == 0:
            raise UserError(f"data.sources[{i}] ({src.path}) yields no sequence of seq_len={cfg.seq_len}")
        all_ids.append(ids)
        all_labels.append(labels)
    return torch.cat(all_ids), torch.cat(all_labels)


@dataclasses.dataclass
class DataPosition:
    """Where the sample stream stands; saved in every checkpoint."""
    epoch: int = 0
    offset: int = 0


class StepSampler:
    """Global-batch sampler: indices for (rank, micro-step) of the next optimizer step."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, shuffle: bool):
        if global_batch > num_samples:
            raise UserError(f"the global batch ({global_batch} sequences = batch_size x world size x "
                            f"gradient_accumulation_steps) is larger than the dataset ({num_samples} sequences)")
        self.n, self.global_batch, self.seed, self.shuffle = num_samples, global_batch, seed, shuffle
        self.pos = DataPosition()
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            self._perm_epoch = epoch
        return self._perm

    def next_step(self) -> torch.Tensor:
        """The global batch of the next step; drops an epoch's ragged tail."""
        if self.pos.offset + self.global_batch > self.n:
            self.pos = DataPosition(self.pos.epoch + 1, 0)
        idx = self._permutation(self.pos.epoch)[self.pos.offset : self.pos.offset + self.global_batch]
        self.pos = DataPosition(self.pos.epoch, self.pos.offset + self.global_batch)
        return idx

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.pos)

    def load_state_dict(self, state: dict) -> None:
        self.pos = DataPosition(**state)


def micro_batches(global_idx: torch.Tensor, rank: int, world: int, accum: int) -> Iterator[torch.Tensor]:
    """Split one step's global indices: rank r owns a contiguous slice, cut into `accum` micro-batches."""
    per_rank = len(global_idx) // world
    mine = global_idx[rank * per_rank : (rank + 1) * per_rank]
    per_micro = per_rank // accum
    for m in range(accum):
        yield mine[m * per_micro : (m + 1) * per_micro]
