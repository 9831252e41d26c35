"""Fixed-length rows read by index from the memory-mapped cache, in one of three packings.

- documents (default): documents are concatenated and cut into rows of seq_len, and each row
  carries position ids that restart at every document start (and at the row start, where a
  document cut by the previous row continues as a fresh segment). Given `position_ids` and no
  attention mask, transformers (5.x, `masking_utils.find_packed_sequence_indices`) builds a
  block-causal mask for sdpa, eager and flex attention, so no token attends to another
  document. The first token of a document is not predicted from the previous document: its
  label is ignored.
- concat: the same rows without position ids: plain causal attention across documents.
- pad: one sample per row, truncated or padded; padding carries no loss (causal attention means
  real tokens never see the padding after them).

Rows are gathered with fancy indexing on np.memmap views: only the pages of the requested rows
are read, so a rank's memory does not grow with the corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from qat.data.cache import DOC_START, SUPERVISED
from qat.data.sources import IGNORE


class SourceRows:
    """The [num_rows, seq_len] views of one cache entry (its ragged tail dropped, max_samples applied)."""

    def __init__(self, entry: Path, manifest: dict, seq_len: int, max_samples: Optional[int]):
        n_tok = manifest["num_tokens"]
        tokens = np.memmap(entry / "tokens.bin", dtype=manifest["dtype"], mode="r", shape=(n_tok,))
        flags = np.memmap(entry / "flags.bin", dtype=np.uint8, mode="r", shape=(n_tok,))
        rows = n_tok // seq_len
        if max_samples is not None:
            rows = min(rows, max_samples)
        self.tokens = tokens[: rows * seq_len].reshape(rows, seq_len)
        self.flags = flags[: rows * seq_len].reshape(rows, seq_len)
        self.num_rows, self.seq_len, self.flags_path = rows, seq_len, entry / "flags.bin"
        self.pad = manifest.get("key", {}).get("layout") == "pad"


def usage(rows: SourceRows, manifest: dict, src) -> dict:
    """How many rows of a source the sequences use, and how many were left out, by reason.

    Every row (document) read becomes one document of the entry. A document is used when a used
    sequence holds its first token (a document cut by the end of the last used sequence counts).
    The others: rows past `max_rows` (not read), documents past `max_samples`, documents that lie
    in the last partial sequence (dropped: a sequence is seq_len tokens), and documents with no
    token at all (nothing to pack). Entries built before these counts were kept lack rows_in_source.
    """
    read, empty = manifest["num_docs"], manifest.get("empty_docs", 0)
    in_source = manifest.get("rows_in_source")
    out = {"read": read, "in_source": in_source, "past_max_rows": (in_source - read) if in_source else 0,
           "sequences": rows.num_rows, "truncated": manifest.get("truncated_docs", 0),
           "no_loss": manifest.get("no_loss_docs", 0), "empty": 0, "past_max_samples": 0, "tail": 0}
    if rows.pad:  # one document per sequence; an empty one is a sequence of padding
        out["past_max_samples"] = read - rows.num_rows
    else:
        L, n_tok = rows.seq_len, manifest["num_tokens"]
        full = n_tok // L
        out["empty"] = empty
        out["past_max_samples"] = _count_starts(rows.flags_path, rows.num_rows * L, full * L)
        out["tail"] = _count_starts(rows.flags_path, full * L, n_tok)
    out["used"] = read - out["empty"] - out["past_max_samples"] - out["tail"]
    return out


def _count_starts(flags_path: Path, start: int, stop: int, chunk: int = 1 << 23) -> int:
    """Documents starting in tokens [start, stop) of an entry, read (not mapped) in chunks."""
    n = 0
    with open(flags_path, "rb") as f:
        f.seek(start)
        while start < stop:
            buf = np.frombuffer(f.read(min(chunk, stop - start)), np.uint8)
            n += int(np.count_nonzero(buf & DOC_START))
            start += max(len(buf), 1)
    return n


def describe_use(u: dict, src, seq_len: int, layout: str) -> str:
    """One line: '<used> of <rows> rows used, in <n> sequences of <seq_len> tokens; dropped: ...'."""
    total = u["in_source"] if u["in_source"] is not None else u["read"]
    line = f"{u['used']:,} of {total:,} rows used, in {u['sequences']:,} sequences of {seq_len} tokens"
    dropped = [(u["past_max_rows"], f"past max_rows={src.max_rows}"),
               (u["past_max_samples"], f"past max_samples={src.max_samples}"),
               (u["tail"], "in the last partial sequence"), (u["empty"], "empty (no tokens)")]
    dropped = [f"{n:,} {why}" for n, why in dropped if n]
    if dropped:
        line += "; dropped: " + ", ".join(dropped)
    notes = []
    if u["truncated"]:
        notes.append(f"{u['truncated']:,} cut to seq_len={seq_len} (packing=pad)")
    if u["no_loss"] and src.kind == "chat":
        notes.append(f"{u['no_loss']:,} without assistant tokens{' after the cut' if layout == 'pad' else ''} "
                     f"(kept, no loss)")
    if notes:
        line += f"; of the {u['read']:,} rows read: " + ", ".join(notes)
    return line


class PackedData:
    """All sources' rows under one global index: source 0's rows, then source 1's, ..."""

    def __init__(self, sources: list[SourceRows], seq_len: int, packing: str):
        self.sources, self.seq_len, self.packing = sources, seq_len, packing
        self.sizes = [s.num_rows for s in sources]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, idx: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, flags) of the global rows `idx`, as [len(idx), seq_len] arrays."""
        idx = np.asarray(idx, dtype=np.int64)
        src = np.searchsorted(self.offsets, idx, side="right") - 1
        tokens = np.empty((len(idx), self.seq_len), np.int64)
        flags = np.empty((len(idx), self.seq_len), np.uint8)
        for s in np.unique(src):
            sel = src == s
            local = idx[sel] - self.offsets[s]
            tokens[sel] = self.sources[s].tokens[local]
            flags[sel] = self.sources[s].flags[local]
        return tokens, flags

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(input_ids, labels, position_ids or None) for the global rows `idx`."""
        return rows_to_batch(*self.rows(idx), self.packing)


def rows_to_batch(tokens: np.ndarray, flags: np.ndarray, packing: str):
    """(input_ids, labels, position_ids or None) of [rows, seq_len] tokens and flags; one home for the
    label and position rules, shared by the memory-mapped and the streaming path."""
    ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
    flags = torch.from_numpy(np.ascontiguousarray(flags))
    labels = torch.where((flags & SUPERVISED).bool(), ids, IGNORE)
    if packing != "documents":
        return ids, labels, None
    start = (flags & DOC_START).bool()
    labels[start] = IGNORE  # the first token of a document is not predicted from the previous one
    return ids, labels, document_positions(start)


def document_positions(start: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at each True of `start` and at each row start."""
    col = torch.arange(start.shape[1]).expand_as(start)
    start = start.clone()
    start[:, 0] = True
    last_start = torch.where(start, col, 0).cummax(dim=1).values
    return col - last_start


def flash_varlen_kwargs(model, position_ids: Optional[torch.Tensor]) -> dict:
    """For a flash attention and packed documents: the varlen kwargs that keep documents apart at
    any batch size; {} otherwise.

    transformers (5.x, `modeling_flash_attention_utils._flash_attention_forward`) infers
    `cu_seqlens` from `position_ids` only when the batch holds one row (`_is_packed_sequence`).
    Given `cu_seq_lens_q/k` and `max_length_q/k`, it flattens the batch's [B, L] tokens into one
    sequence of B*L and calls `flash_attn_varlen_func` on them, whatever B is. Every row of ours
    starts a segment at position 0, so the segment starts of the flattened batch are exactly the
    positions equal to 0, and no segment crosses a row.
    """
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    if position_ids is None or "flash" not in impl:
        return {}
    return varlen_kwargs(position_ids)


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """cu_seq_lens_q/k and max_length_q/k of the segments of the flattened batch (starts: position 0)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1).to(torch.int32)
    cu = torch.cat([starts, torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)])
    longest = int(cu.diff().max())  # an int: the flash kernels take max_seqlen as a host number
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
