"""Streaming sources: the memory-mapped path's rows, sharded by rank, resumable bitwise and across world sizes."""

import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import base_overrides, losses, read_metrics, run_train
from qat.config import DataConfig, DataSource
from qat.data import StreamLoader, build_dataset, build_loader
from qat.data.stream import Position, RankStream, merge_positions, reshard
from qat.errors import UserError


@pytest.fixture(scope="module")
def tok(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world / "model")


def stream_cfg(world, packing="documents", kind="text", max_rows=120, streaming=True, seq_len=64,
               **kw) -> DataConfig:
    name = "pretrain" if kind == "text" else "finetune"
    src = DataSource(path=str(world / f"data/{name}.jsonl"), kind=kind, max_rows=max_rows, streaming=streaming)
    return DataConfig(sources=[src], seq_len=seq_len, packing=packing, shuffle=False, **kw)


def take(data, rank, world, n, start=Position(), skip=frozenset()):
    return list(itertools.islice(RankStream(data, rank, world, start, skip).rows(), n))


@pytest.mark.parametrize("kind, packing", [("text", "documents"), ("chat", "pad")])
def test_a_stream_of_one_rank_has_the_memory_mapped_rows_and_resumes_from_any_row(world, tok, tmp_path,
                                                                                  kind, packing):
    """Same tokens, flags (so labels and position ids) as the cache, in order; epoch 1 follows epoch 0."""
    mapped = build_dataset(stream_cfg(world, packing, kind, streaming=False, cache_dir=str(tmp_path), num_proc=1), tok)
    data = build_dataset(stream_cfg(world, packing, kind), tok)
    n = len(mapped)
    rows = take(data, 0, 1, n + 3)
    tokens, flags = mapped.rows(np.arange(n))
    assert np.array_equal(np.stack([r.tokens for r in rows[:n]]), tokens)
    assert np.array_equal(np.stack([r.flags for r in rows[:n]]), flags)
    # the cache drops its ragged tail; the stream goes on into epoch 1, where g keeps counting
    assert rows[-1].docs[-1] >= 120 and rows[-1].after.g >= 120
    for k in (1, 5, n - 1):  # a restart from the position after row k gives the rows after it
        rest = take(data, 0, 1, 3, start=rows[k - 1].after)
        assert all(np.array_equal(a.tokens, b.tokens) and np.array_equal(a.flags, b.flags)
                   for a, b in zip(rest, rows[k:k + 3]))


def test_ranks_share_the_documents_and_a_new_world_size_repeats_none(world, tok):
    """World 2 -> 3 -> 1: every document is read by exactly one rank; the only documents never
    read are the rests of those cut at a change of world size (the documented rule)."""
    data = build_dataset(stream_cfg(world, max_rows=400), tok)
    seen: dict[int, int] = {}  # document -> how many rank-readings started it (a cut one counts once)

    def consume(world_size, starts, skip, counts):
        positions, cut = [], set()
        for r, n in enumerate(counts):
            rows = take(data, r, world_size, n, start=starts[r], skip=skip)
            for g in dict.fromkeys(g for row in rows for g in row.docs):
                assert g % world_size == r and g not in skip
                seen[g] = seen.get(g, 0) + 1
            positions.append(rows[-1].after if rows else starts[r])
            if positions[-1].offset:
                cut.add(positions[-1].g)
        return positions, cut

    pos, cut = consume(2, [Position()] * 2, frozenset(), [9, 4])  # rank 0 runs ahead of rank 1
    state = merge_positions(pos, 2, frozenset(), None)
    assert json.loads(json.dumps(state)) == state  # it goes into meta.json
    starts, skip = zip(*[reshard(state, r, 3) for r in range(3)])
    assert len(set(skip)) == 1 and skip[0] and min(skip[0]) >= min(p.g for p in pos)
    pos3, cut3 = consume(3, list(starts), skip[0], [3, 6, 2])
    state = merge_positions(pos3, 3, skip[0], None)
    start1, skip1 = reshard(state, 0, 1)
    (final,), _ = consume(1, [start1], skip1, [10])
    assert max(seen.values()) == 1  # no document twice: not even the rest of one cut at a change
    assert set(range(final.g)) <= set(seen)  # and none below the last position left out
    assert cut | cut3  # the case of a cut document did occur
    # the same world size restores each rank's own position: the rows continue exactly
    assert reshard(merge_positions(pos, 2, frozenset(), None), 1, 2) == (pos[1], frozenset())


def test_streaming_refusals_one_line_each(world, tok):
    src = dict(path=str(world / "data/pretrain.jsonl"), kind="text")
    cases = [
        ([DataSource(**src, streaming=True), DataSource(**src)], "stream every source or none"),
        ([DataSource(**src, streaming=True, weight=1.0)], "weight is not supported with streaming"),
        ([DataSource(**src, streaming=True, max_samples=4)], "use max_rows"),
        ([DataSource(**{**src, "column": "nope"}, streaming=True)], "has no column 'nope'"),
        ([DataSource(**{**src, "kind": "chat", "column": "text"}, streaming=True)], "not conversations"),
        ([DataSource(**{**src, "path": str(world / "data/missing.jsonl")}, streaming=True)], "no such file"),
    ]
    for sources, why in cases:
        with pytest.raises(UserError, match=why):
            build_dataset(DataConfig(sources=sources, seq_len=64), tok)
    stream = StreamLoader(build_dataset(stream_cfg(world), tok), 0, 1, 2, 1, torch.device("cpu"))
    with pytest.raises(UserError, match="memory-mapped data.sources; this config streams"):
        stream.load_state_dict({"epoch": 0, "offset": 8})


def test_stream_loader_batches_positions_and_labels(world, tok):
    """The loader's micro-batches are the rank's rows with the shared label and position rules."""
    data = build_dataset(stream_cfg(world), tok)
    loader = build_loader(data, stream_cfg(world), type("T", (), {"batch_size": 2, "gradient_accumulation_steps": 2,
                                                                   "seed": 0})(), torch.device("cpu"), 1, 2)
    try:
        (ids, labels, pos), second = loader.next_batches()
        rows = take(data, 1, 2, 4)
        assert torch.equal(ids, torch.from_numpy(np.stack([r.tokens for r in rows[:2]])))
        assert torch.equal(second[0], torch.from_numpy(np.stack([r.tokens for r in rows[2:]])))
        assert loader.position == rows[3].after
        starts = torch.from_numpy(np.stack([r.flags for r in rows[:2]]) & 2).bool()
        assert (labels[starts] == -100).all() and (pos[starts] == 0).all() and pos[0, 0] == 0
        assert loader.state_dict()["positions"] == [[rows[3].after.g, rows[3].after.offset]]  # no process group
    finally:
        loader.close()
    # a checkpoint of 2 ranks resumed by one: it starts at the slower rank and skips what the faster used
    one = StreamLoader(data, 0, 1, 2, 1, torch.device("cpu"))
    one.load_state_dict({"stream": True, "world": 2, "positions": [[9, 0], [4, 7]], "skip": [], "docs_per_epoch": None})
    assert one.position == Position(4, 0) and one.skip == {4, 6, 8}
    (ids, _, _), = one.next_batches()
    assert [r.docs[0] for r in take(data, 0, 1, 1, Position(4, 0), frozenset({4, 6, 8}))] == [5]
    assert torch.equal(ids[0], torch.from_numpy(take(data, 0, 1, 1, Position(5, 0))[0].tokens))
    one.close()


def test_streaming_training_resumes_bitwise_from_its_checkpoint(world, tmp_path):
    """torchrun world 2, 6 steps with a checkpoint at 3, then resumed from step 3 at world 2: the
    same losses, exactly. (The rule at another world size is tested in-process above: a launch
    costs ~15 s of CI.)"""
    sources = (f"[{{path: {world}/data/finetune.jsonl, kind: chat, streaming: true}},"
               f" {{path: {world}/data/pretrain.jsonl, kind: text, max_rows: 200, streaming: true}}]")
    common = [f"data.sources={sources}", "checkpoint.every_n_steps=3", "data.shuffle=false"]
    straight, again = tmp_path / "straight", tmp_path / "again"
    run_train(base_overrides(world, straight) + common, 2)
    step3 = straight / "checkpoints" / "step-000003"
    meta3 = json.loads((step3 / "meta.json").read_text())["data"]
    assert meta3["stream"] and meta3["world"] == 2 and meta3["skip"] == []
    (g0, _), (g1, _) = meta3["positions"]
    assert 0 < g0 != g1 > 0  # each rank's own position
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, again / "checkpoints" / step3.name)
    run_train(base_overrides(world, again) + common + ["checkpoint.resume=auto"], 2)
    assert losses(again) == losses(straight)[3:]  # exact float equality
    assert [m["data/epoch"] for m in read_metrics(again)] == [0, 0, 0]
    end = json.loads((again / "checkpoints" / "step-000006" / "meta.json").read_text())["data"]
    assert end == json.loads((straight / "checkpoints" / "step-000006" / "meta.json").read_text())["data"]


def test_flash_varlen_kwargs_keep_documents_apart_at_batch_2(world, tok):
    """The kwargs reach the attention at batch > 1 and their segments are the documents: an
    attention that attends only within cu_seq_lens segments of the flattened batch (what
    flash_attn_varlen_func does) gives each document its logits alone. (A name containing
    "flash" would make transformers look for the flash_attn package.)"""
    import torch.nn.functional as F
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM

    from qat.data import flash_varlen_kwargs
    from qat.data.packed import rows_to_batch, varlen_kwargs

    def varlen(module, q, k, v, mask, cu_seq_lens_q=None, max_length_q=None, **kw):
        assert cu_seq_lens_q is not None and isinstance(max_length_q, int)  # the kwargs arrived
        b, h, n, d = q.shape
        k, v = (x.repeat_interleave(h // x.shape[1], 1) for x in (k, v))
        q, k, v = (x.transpose(1, 2).reshape(b * n, h, d) for x in (q, k, v))  # the flattened batch
        out = torch.empty_like(q)
        for s, e in zip(cu_seq_lens_q[:-1].tolist(), cu_seq_lens_q[1:].tolist()):
            seg = [x[s:e].transpose(0, 1) for x in (q, k, v)]
            out[s:e] = F.scaled_dot_product_attention(*seg, is_causal=True, scale=module.scaling).transpose(0, 1)
        return out.reshape(b, n, h, d), None

    AttentionInterface.register("varlen_reference", varlen)
    AttentionMaskInterface.register("varlen_reference", lambda *a, **kw: None)
    model = AutoModelForCausalLM.from_pretrained(world / "model", attn_implementation="varlen_reference",
                                                 dtype=torch.float32).eval()
    rows = take(build_dataset(stream_cfg(world, seq_len=512), tok), 0, 1, 2)
    ids, _, pos = rows_to_batch(np.stack([r.tokens for r in rows]), np.stack([r.flags for r in rows]), "documents")
    kw = varlen_kwargs(pos)
    flash = type("M", (), {"config": type("C", (), {"_attn_implementation": "flash_attention_2"})()})()
    assert flash_varlen_kwargs(flash, pos).keys() == kw.keys() and flash_varlen_kwargs(model, pos) == {}
    assert kw["cu_seq_lens_q"].tolist() == (pos.reshape(-1) == 0).nonzero().view(-1).tolist() + [ids.numel()]
    assert len(kw["cu_seq_lens_q"]) > 4  # several documents, and a segment starts at each row
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits
        sdpa = AutoModelForCausalLM.from_pretrained(world / "model", attn_implementation="sdpa", dtype=torch.float32)
        for r in range(2):
            starts = (pos[r] == 0).nonzero().view(-1).tolist() + [pos.shape[1]]
            for s, e in zip(starts[:-1], starts[1:]):
                alone = sdpa(input_ids=ids[r:r + 1, s:e], use_cache=False).logits[0]
                assert torch.allclose(packed[r, s:e], alone, atol=1e-5), (r, s, e)
    assert flash_varlen_kwargs(sdpa, pos) == {}
