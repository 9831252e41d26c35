"""Where samples come from: local files or hub datasets, and how one sample becomes tokens.

Two kinds of source:
- text: a plain-text column (C4-like); each document is followed by EOS;
- chat: a column of conversations rendered with the tokenizer's chat template; only assistant
  tokens carry a loss. OpenAI's `messages: [{role, content}]` or ShareGPT's
  `conversations: [{from, value}]`, roles renamed by data.chat.roles and checked against the
  template (qat/data/chat.py).

The tokenize functions are batched `datasets.map` functions: they return, per sample, the
token ids and (chat only) a 0/1 "supervised" flag per token.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Optional

import numpy as np

from qat.config import DataSource
from qat.data.chat import LAYOUTS, normalize
from qat.errors import UserError

IGNORE = -100
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in BUILDERS or Path(path).exists()


def default_column(src: DataSource) -> str:
    return src.column or ("text" if src.kind == "text" else "messages")


def resolve_column(src: DataSource, names) -> str:
    """The column to read: the configured one, or the default; a chat source without a `messages`
    column reads ShareGPT's `conversations` when it has one."""
    column = default_column(src)
    if src.column is None and src.kind == "chat" and column not in names and "conversations" in names:
        return "conversations"
    return column


def local_files(src: DataSource, index: int) -> Optional[list[Path]]:
    """The files of a local source (sorted), None for a hub dataset; bad paths fail here."""
    if not _looks_local(src.path):
        return None
    where = f"data.sources[{index}]"
    p = Path(src.path).expanduser()
    if not p.exists():
        raise UserError(f"{where}.path: no such file or folder: {src.path}")
    files = sorted(f for f in p.iterdir() if f.suffix in BUILDERS) if p.is_dir() else [p]
    if not files:
        raise UserError(f"{where}.path: no .json/.jsonl/.parquet/.csv files in {src.path}")
    if files[0].suffix not in BUILDERS:
        raise UserError(f"{where}.path: unsupported file type {files[0].suffix!r} ({', '.join(BUILDERS)})")
    return [f.resolve() for f in files]


def source_identity(src: DataSource, index: int) -> dict:
    """What identifies a source's content without reading it: files by path, size and mtime;
    hub datasets by name, config, revision and split (pin `revision` to notice upstream changes)."""
    files = local_files(src, index)
    if files is not None and src.data_files:
        raise UserError(f"data.sources[{index}].data_files selects files of a hub dataset; "
                        f"for local files, point path at the file or folder")
    if files is None:
        return {"hub": src.path, "name": src.name, "revision": src.revision, "split": src.split,
                "data_files": list(src.data_files)}
    return {"files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def load_source(src: DataSource, index: int, cache_dir: Optional[str] = None):
    """A `datasets.Dataset` from a local file/folder or a hub dataset name (same code path).

    `cache_dir` receives the Arrow copy of local files (a build's scratch folder); hub datasets
    keep the HF cache, where the download lives.
    """
    import datasets

    files = local_files(src, index)
    try:
        if files is not None:
            ds = datasets.load_dataset(BUILDERS[files[0].suffix], data_files=[str(f) for f in files],
                                       split="train", cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(src.path, src.name, split=src.split, revision=src.revision,
                                       data_files=list(src.data_files) or None)
    except StopIteration:  # datasets' json builder on a file with no rows at all
        raise UserError(f"data.sources[{index}]: {src.path} is empty") from None
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as e:
        raise UserError(f"data.sources[{index}]: {src.path} does not parse: {_parse_problem(e)}") from None
    column = resolve_column(src, ds.column_names)
    if column not in ds.column_names:
        raise UserError(f"data.sources[{index}]: {src.path} has no column {column!r} "
                        f"(columns: {', '.join(ds.column_names)})")
    check_column(ds, column, src, index)
    return ds, column


def _parse_problem(e: BaseException) -> str:
    """The library's own reason, one line, with pyarrow's 0-based 'row N' given as a file line too."""
    import re

    cause = e.__cause__ or e.__context__ or e
    msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    row = re.search(r"in row (\d+)", msg)
    return msg + (f" (line {int(row.group(1)) + 1})" if row else "")


def check_column(ds, column: str, src: DataSource, index: int) -> None:
    """Rows the tokenizer can take: text is a string column without nulls; chat is a list of
    {role, content} or {from, value} messages. Checked on the Arrow schema and null counts, not
    row by row (the roles are checked by qat.data.chat.first_refused)."""
    where = f"data.sources[{index}]: {src.path}"
    if len(ds) == 0:
        raise UserError(f"{where} has no rows")
    feature = ds.features[column]
    if src.kind == "text" and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"{where}: column {column!r} holds {_describe_feature(feature)}, not text; "
                        f"point data.sources[{index}].column at a text column")
    if src.kind == "chat":
        inner = feature[0] if isinstance(feature, list) else getattr(feature, "feature", None)
        if not (isinstance(inner, dict) and any(set(pair) <= set(inner) for pair in LAYOUTS)):
            raise UserError(f"{where}: column {column!r} holds {_describe_feature(feature)}, not conversations "
                            f"(lists of {{role, content}} or {{from, value}} messages)")
    nulls = ds.data.column(column).null_count
    if nulls:
        import pyarrow.compute as pc

        first = pc.index(pc.is_null(ds.data.column(column)), True).as_py()
        raise UserError(f"{where}: {nulls} row(s) of column {column!r} are null, the first at row {first} "
                        f"(line {first + 1} of a JSON-lines file); remove or fill them")


def _describe_feature(feature) -> str:
    return getattr(feature, "dtype", None) or type(feature).__name__


def encode_texts(texts: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The documents' token ids back to back (int32), each followed by EOS, and their lengths.

    Calls the Rust tokenizer's `encode_batch_fast` (no character offsets) and flattens its ids
    with numpy: the transformers wrapper builds five Python lists per document, about a quarter
    of the build's time. Same ids as `tokenizer(texts, add_special_tokens=True)`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]
    else:
        ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(lengths.sum()))
    eos = tokenizer.eos_token_id
    if eos is None:
        return flat, lengths
    ends = np.cumsum(lengths + 1) - 1  # where each document's EOS goes
    out = np.empty(len(flat) + len(ids), np.int32)
    keep = np.ones(len(out), bool)
    keep[ends] = False
    out[ends], out[keep] = eos, flat
    return out, lengths + 1


def tokenize_text_arrow(batch, column: str, tokenizer):
    """`datasets.map` on Arrow batches: a table with one list<int32> column `ids`, built from
    numpy buffers without a Python list per token."""
    import pyarrow as pa

    flat, lengths = encode_texts(batch.column(column).to_pylist(), tokenizer)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table({"ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))})


def tokenize_text_batch(batch: dict, column: str, tokenizer) -> dict:
    flat, lengths = encode_texts(batch[column], tokenizer)
    return {"ids": [x.tolist() for x in np.split(flat, np.cumsum(lengths)[:-1])]}


def tokenize_chat_batch(batch: dict, column: str, tokenizer, roles: Optional[dict] = None) -> dict:
    """Conversations of either layout, roles renamed by `roles` (data.chat.roles), checked before."""
    out = tokenize_chat([normalize(c, roles or {}) for c in batch[column]], tokenizer)
    return {"ids": [ids for ids, _ in out], "sup": [[int(l != IGNORE) for l in labels] for _, labels in out]}


def tokenize_text(texts: list[str], tokenizer) -> list[tuple[list[int], list[int]]]:
    ids = tokenize_text_batch({"text": texts}, "text", tokenizer)["ids"]
    return [(x, x) for x in ids]


def _assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of each assistant reply.

    Works for any template with the prefix property: the rendering of the first k turns is a
    prefix of the full rendering. The span of assistant turn i runs from the end of the
    rendering of turns < i plus the generation prompt, to the end of the rendering of turns <= i.
    """
    def render(msgs, gen=False):
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except TemplateError as e:  # a template that does not compile, or raise_exception() on this row
            raise UserError(f"the tokenizer's chat template fails on the conversation {_excerpt(messages)}: "
                            f"{type(e).__name__}: {str(e).rstrip('.')}; fix chat_template in the model folder's tokenizer_config.json "
                            f"(or chat_template.jinja), or the rows") from None

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


def _excerpt(messages, n: int = 120) -> str:
    text = repr([{"role": m.get("role"), "content": m.get("content")} for m in messages])
    return text if len(text) <= n else text[:n] + "...]"


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


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
