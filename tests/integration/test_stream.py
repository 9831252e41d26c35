"""Streaming sources: the memory-mapped path's rows, sharded by rank, mixed by weight, shuffled,
resumable bitwise and across world sizes."""

from pathlib import Path
import itertools
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from qat.config import DataConfig, DataSource
from qat.data import StreamLoader, build_dataset, build_loader
from qat.data.mix import BLOCK, Mixture
from qat.data.packed import rows_to_batch
from qat.data.stream import Position, RankStream, document_order, epoch_values, merge_positions, reshard
from qat.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def stream_cfg(world, packing="documents", kind="text", max_rows=120, streaming=True, seq_len=64,
               shuffle=False, **kw) -> DataConfig:
    name = "pretrain" if kind == "text" else "finetune"
    src = DataSource(path=str(world / f"data/{name}.jsonl"), kind=kind, max_rows=max_rows, streaming=streaming)
    return DataConfig(sources=[src], seq_len=seq_len, packing=packing, shuffle=shuffle, **kw)


def mixed_cfg(world, weights=(1.0, 3.0), shuffle=True, **kw) -> DataConfig:
    """A chat source of 12 documents and a text source of 16, weighted 1:3: the text source cycles faster."""
    sources = [DataSource(path=str(world / "data/finetune.jsonl"), kind="chat", max_rows=12, streaming=True),
               DataSource(path=str(world / "data/pretrain.jsonl"), kind="text", max_rows=16, streaming=True)]
    for src, w in zip(sources, weights or (None, None)):
        src.weight = w
    return DataConfig(sources=sources, seq_len=64, shuffle=shuffle, shuffle_buffer=8, **kw)


def take(data, rank, world, n, start=Position(), skip=frozenset(), docs_per_epoch=None):
    return list(itertools.islice(RankStream(data, rank, world, start, skip, docs_per_epoch).rows(), n))


def docs(order, start, n):
    return list(itertools.islice(order.rows_from(start), n))


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


@pytest.mark.parametrize("mixed", [False, True], ids=["chained", "weighted-shuffled"])
def test_ranks_share_the_documents_and_a_new_world_size_repeats_none(world, tok, mixed):
    """World 2 -> 3 -> 1: every document is read by exactly one rank; the only documents never
    read are the rests of those cut at a change of world size (the documented rule). Weighted
    and shuffled streams keep the rule: it is about g only, and g's document is fixed."""
    data = build_dataset(mixed_cfg(world) if mixed else stream_cfg(world, max_rows=400), tok, seed=1)
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


def test_the_mixture_draws_each_source_by_weight_from_the_seed_alone():
    """Over 5 blocks of documents each source's share is its weight's, within 4 standard deviations
    (the draw is seeded: this is a fixed outcome, not a flaky bound); the documents each source gave
    before any g are computed, not replayed; another seed gives another order."""
    weights, n = [1.0, 3.0, 0.5], 5 * BLOCK + 123
    mix = Mixture(weights, seed=11)
    drawn = np.concatenate([mix.block(b) for b in range(6)])[:n]
    p = np.asarray(weights) / sum(weights)
    share = np.bincount(drawn, minlength=3) / n
    assert np.all(np.abs(share - p) < 4 * np.sqrt(p * (1 - p) / n)), (share, p)
    assert np.bincount(drawn, minlength=3).tolist() == [72865, 218077, 36861]  # seed 11's outcome
    for g in (0, 1, BLOCK - 1, BLOCK, 3 * BLOCK + 17, n):
        assert np.array_equal(Mixture(weights, 11).counts_before(g), np.bincount(drawn[:g], minlength=3))
    assert np.array_equal(Mixture(weights, 11).block(2), mix.block(2))
    # another seed: 32366 of the block's 65536 draws differ (49.4%, as independent draws do: 1 - sum(p^2))
    assert int(np.sum(Mixture(weights, 12).block(0) != mix.block(0))) == 32366 and len(mix.block(0)) == 65536
    big = Mixture([1.0, 3.0], seed=0).counts_before(10**9)  # a resume at a billion documents: ~15k blocks
    assert big.tolist() == [250002420, 749997580]  # seed 0's outcome: 0.25 of them within 1e-5


def test_weighted_streams_cycle_each_source_and_resume_bitwise_at_any_document(world, tok):
    """Document g is its source's next document; each source has its own epochs (the text source,
    small for its weight, wraps about twice as often as the chat one), and a start at any g, with or without
    the epochs' lengths known, gives the same documents as the stream that did not stop."""
    data = build_dataset(mixed_cfg(world), tok, seed=5)
    order = document_order(data)
    straight = docs(order, 0, 160)
    assert order.docs_per_epoch == [12, 16]
    sources = np.array([s for _, s, _ in straight])
    assert sources.tolist() == Mixture([1.0, 3.0], 5).block(0)[:160].tolist()
    for s, n in ((0, 12), (1, 16)):
        mine = [v for _, t, v in straight if t == s]
        expect = [v for e in range(len(mine) // n + 1) for v in epoch_values(data, s, e)][:len(mine)]
        assert mine == expect  # k-th document of source s: row k % n of its epoch k // n
    assert order.epochs(160) == [int((sources == 0).sum()) // 12, int((sources == 1).sum()) // 16]
    assert order.epochs(160)[1] > order.epochs(160)[0] >= 2
    for g in (1, 37, 101):
        for known in (None, [12, 16]):
            assert docs(document_order(data, known), g, 20) == straight[g:g + 20]


def test_weighted_shuffled_stream_loader_resumes_bitwise_from_its_state(world, tok):
    """World 2, weights and shuffle: each rank's loader built from the saved state yields the rows of
    the rank that did not stop (tokens, labels, positions), whether the epochs' lengths were known."""
    data = build_dataset(mixed_cfg(world), tok, seed=5)
    n, m = 30, 6
    streams = [RankStream(data, r, 2, Position(), frozenset()) for r in range(2)]
    rows = [list(itertools.islice(st.rows(), n + m)) for st in streams]
    assert streams[0].order.docs_per_epoch[1] == 16  # the text source wrapped before the stop
    state = merge_positions([r[n - 1].after for r in rows], 2, frozenset(), [None, 16], data.order_record())
    state = json.loads(json.dumps(state))  # it goes into meta.json
    for saved in (state, {**state, "docs_per_epoch": None}):
        for r in range(2):
            loader = StreamLoader(data, r, 2, m, 1, torch.device("cpu"))
            loader.load_state_dict(saved)
            try:
                (got,) = loader.next_batches()
                expect = rows_to_batch(np.stack([x.tokens for x in rows[r][n:]]),
                                       np.stack([x.flags for x in rows[r][n:]]), "documents")
                assert all(torch.equal(a, b) for a, b in zip(got, expect))
                assert loader.position == rows[r][-1].after
                per = loader.epochs()
                assert per["data/epoch"] == min(per["data/epoch/0"], per["data/epoch/1"]) and per["data/epoch/1"] >= 1
            finally:
                loader.close()


def test_shuffled_streams_reorder_each_epoch_alike_on_every_rank(world, tok):
    """data.shuffle: each epoch of a source is a permutation of its rows, unlike the file's order,
    different from the next epoch's, the same on every call; two ranks' documents interleave into
    one world's, and a restart inside epoch 1 gives the rows that followed."""
    data = build_dataset(stream_cfg(world, max_rows=20, shuffle=True, shuffle_buffer=8), tok, seed=2)
    in_order = list(epoch_values(build_dataset(stream_cfg(world, max_rows=20), tok), 0, 0))
    e0, e1 = list(epoch_values(data, 0, 0)), list(epoch_values(data, 0, 1))
    assert sorted(e0) == sorted(e1) == sorted(in_order) and len(set(in_order)) == 20
    assert e0 != in_order and e1 != e0 and e0 == list(epoch_values(data, 0, 0))
    chained = docs(document_order(data), 0, 50)
    assert [v for _, _, v in chained] == (e0 + e1 + list(epoch_values(data, 0, 2)))[:50]
    one = {g: ids.tolist() for g, ids, _ in itertools.islice(RankStream(data, 0, 1, Position(), frozenset()).documents(), 45)}
    for r in range(2):
        for g, ids, _ in itertools.islice(RankStream(data, r, 2, Position(), frozenset()).documents(), 20):
            assert g % 2 == r and ids.tolist() == one[g]
    rows = take(data, 0, 1, 90)
    k = next(i for i, x in enumerate(rows) if x.after.g > 25)  # a row ending inside epoch 1 (documents 20..39)
    for known in (None, 20):
        assert all(np.array_equal(a.tokens, b.tokens) and np.array_equal(a.flags, b.flags)
                   for a, b in zip(take(data, 0, 1, 5, rows[k].after, docs_per_epoch=known), rows[k + 1:k + 6]))


def test_a_resume_with_another_order_stops_with_one_line(world, tok):
    """The checkpoint keeps the weights, shuffle buffer and seed; a resume that changes any stops.
    A checkpoint from before streams mixed or shuffled (no such keys) resumes a chained, in-order config."""
    def state(cfg, seed=0):
        data = build_dataset(cfg, tok, seed=seed, log=lambda m: None)
        return merge_positions([Position(3, 0)], 1, frozenset(), None, data.order_record()), data

    weighted, _ = state(mixed_cfg(world, shuffle=False))
    chained, chained_data = state(mixed_cfg(world, weights=None, shuffle=False))
    shuffled, _ = state(mixed_cfg(world, weights=None))
    cases = [
        (weighted, mixed_cfg(world, weights=None, shuffle=False), 0, "were mixed by weight, shares [0.25, 0.75], "
                                                                    "this config's are chained"),
        (chained, mixed_cfg(world, shuffle=False), 0, "were chained (no weight), this config's are mixed"),
        (weighted, mixed_cfg(world, weights=(1.0, 1.0), shuffle=False), 0, "shares [0.5, 0.5]"),
        (weighted, mixed_cfg(world, shuffle=False), 3, "training.seed=0, this config has 3"),
        (shuffled, mixed_cfg(world, weights=None, shuffle=False), 0, "shuffled with data.shuffle_buffer=8, "
                                                                     "this config's are read in file order"),
        ({k: v for k, v in chained.items() if k not in ("weights", "shuffle_buffer", "seed")},
         mixed_cfg(world, weights=None), 0, "were read in file order"),
    ]
    for saved, cfg, seed, why in cases:
        loader = StreamLoader(build_dataset(cfg, tok, seed=seed, log=lambda m: None), 0, 1, 1, 1, torch.device("cpu"))
        with pytest.raises(UserError, match=None) as e:
            loader.load_state_dict(saved)
        assert why in str(e.value) and "\n" not in str(e.value), str(e.value)
    # the same order resumes, at any seed when nothing is seeded; so does a checkpoint without the keys
    StreamLoader(chained_data, 0, 1, 1, 1, torch.device("cpu")).load_state_dict(
        {k: v for k, v in chained.items() if k not in ("weights", "shuffle_buffer", "seed")})


def test_streaming_refusals_one_line_each(world, tok):
    src = dict(path=str(world / "data/pretrain.jsonl"), kind="text")
    cases = [
        ([DataSource(**src, streaming=True), DataSource(**src)], "stream every source or none"),
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


def test_streaming_training_resumes_bitwise_from_its_checkpoint(world, tmp_path, capsys, base_overrides, losses, read_metrics, run_train, recipe):
    """torchrun world 2, streams mixed by weight and shuffled, 6 steps with a checkpoint at 3, then
    resumed from step 3 at world 2: the same losses, exactly, and per-source epochs (the text source
    is small for its weight and cycles). (The rule at another world size, and the chain without
    weights, are tested in-process above: a launch costs ~15 s of CI.)"""
    sources = (f"[{{path: {world}/data/finetune.jsonl, kind: chat, streaming: true, weight: 1}},"
               f" {{path: {world}/data/pretrain.jsonl, kind: text, max_rows: 8, streaming: true, weight: 3}}]")
    common = [f"data.sources={sources}", "checkpoint.every_n_steps=3", "data.shuffle=true",
              "data.shuffle_buffer=4", "training.seed=3"]
    straight, again = tmp_path / "straight", tmp_path / "again"
    run_train(base_overrides(world, straight) + common, 2)
    step3 = straight / "checkpoints" / "step-000003"
    meta3 = json.loads((step3 / "meta.json").read_text())["data"]
    assert meta3["stream"] and meta3["world"] == 2 and meta3["skip"] == []
    assert (meta3["weights"], meta3["shuffle_buffer"], meta3["seed"]) == ([0.25, 0.75], 4, 3)
    assert meta3["docs_per_epoch"][1] == 8
    (g0, _), (g1, _) = meta3["positions"]
    assert 0 < g0 != g1 > 0  # each rank's own position
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, again / "checkpoints" / step3.name)
    run_train(base_overrides(world, again) + common + ["checkpoint.resume=auto"], 2)
    assert losses(again) == losses(straight)[3:]  # exact float equality
    epochs = [(m["data/epoch"], m["data/epoch/0"], m["data/epoch/1"]) for m in read_metrics(straight)]
    assert [(m["data/epoch"], m["data/epoch/0"], m["data/epoch/1"]) for m in read_metrics(again)] == epochs[3:]
    assert all(e == min(e0, e1) == 0 for e, e0, e1 in epochs) and epochs[-1][2] > epochs[0][2]
    end = json.loads((again / "checkpoints" / "step-000006" / "meta.json").read_text())["data"]
    assert end == json.loads((straight / "checkpoints" / "step-000006" / "meta.json").read_text())["data"]
    # the same checkpoint resumed without the weights: one line, exit 2 (in-process, world 1)

    chained = sources.replace(", weight: 1", "").replace(", weight: 3", "")
    (tmp_path / "chained" / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, tmp_path / "chained" / "checkpoints" / step3.name)
    with pytest.raises(SystemExit) as e:
        recipe("train").main(["--config", str(ROOT / "configs/tiny/full.yaml"),
                           *base_overrides(world, tmp_path / "chained"), *common[1:], f"data.sources={chained}",
                           "checkpoint.resume=auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: the checkpoint's streams were mixed by weight"), err


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
    cu = kw["cu_seq_lens_q"].tolist()
    assert len(cu) == 7 and 512 in cu  # six segments over the two rows, and the second row starts one
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits
        sdpa = AutoModelForCausalLM.from_pretrained(world / "model", attn_implementation="sdpa", dtype=torch.float32)
        for r in range(2):
            starts = (pos[r] == 0).nonzero().view(-1).tolist() + [pos.shape[1]]
            for s, e in zip(starts[:-1], starts[1:]):
                alone = sdpa(input_ids=ids[r:r + 1, s:e], use_cache=False).logits[0]
                # measured at most 5.4e-7 (fp32; a segment alone is a shorter matmul); a leak across
                # documents moves these logits by about 1
                assert torch.allclose(packed[r, s:e], alone, atol=1e-5), (r, s, e)
    assert flash_varlen_kwargs(sdpa, pos) == {}


def test_prepare_command_builds_the_cache_ahead_of_training(world, tmp_path, env):
    import subprocess
    import sys


    cmd = [sys.executable, "-m", "qat.data", "prepare", "--config", str(ROOT / "configs/tiny/full.yaml"),
           f"model.path={world}/model", f"data.cache_dir={tmp_path}", "data.seq_len=64",
           f"data.sources=[{{path: {world}/data/pretrain.jsonl, kind: text, max_rows: 200}}]"]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "data: sources[0] built" in out.stderr and "tokens/s)" in out.stderr
    assert "sources[0]" in out.stdout and "rows of 64 tokens (documents)" in out.stdout
    assert len(list(tmp_path.glob("*/manifest.json"))) == 1
