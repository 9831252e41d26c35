import json
import shutil
import threading

import numpy as np
from pathlib import Path

import pytest

import torch

from qat.config import DataConfig, DataSource
from qat.data import (IGNORE, MixSampler, StepSampler, build_dataset, build_sampler, micro_batches,
                      tokenize_chat, tokenize_text)
from qat.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def text_cfg(world, cache, **kw) -> DataConfig:
    kw = {"seq_len": 64, "num_proc": 1, **kw}
    return DataConfig(sources=[DataSource(path=str(world / "data/pretrain.jsonl"), max_rows=300)],
                      cache_dir=str(cache), **kw)


def test_chat_loss_only_on_assistant_tokens(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Arden?"},
            {"role": "assistant", "content": "In Norland."}, {"role": "user", "content": "And Brisa?"},
            {"role": "assistant", "content": "Also Norland."}]
    [(ids, labels)] = tokenize_chat([msgs], tok)
    supervised = tok.decode([t for t in labels if t != IGNORE])
    assert supervised == "In Norland.<|end|>\nAlso Norland.<|end|>\n"
    assert len(ids) == len(labels)
    assert tok.decode(ids).startswith("<|bos|><|system|>Be brief.")


def test_concat_rows_are_the_documents_back_to_back_with_eos(world, tok, tmp_path):
    data = build_dataset(text_cfg(world, tmp_path, packing="concat"), tok)
    texts = [json.loads(l)["text"] for l in (world / "data/pretrain.jsonl").read_text().splitlines()[:300]]
    stream = [t for ids, _ in tokenize_text(texts, tok) for t in ids]  # the reference: one flat list
    n = len(stream) // 64
    ids, labels, pos = data.batch(torch.arange(n))
    assert len(data) == n and pos is None
    assert torch.equal(ids, torch.tensor(stream[: n * 64]).view(n, 64)) and torch.equal(ids, labels)
    # an EOS ends each document, at the end of its own tokens, and nowhere else
    ends = np.cumsum([len(tok(t)["input_ids"]) + 1 for t in texts])
    assert (ids.flatten() == tok.eos_token_id).nonzero().flatten().tolist() == [e - 1 for e in ends if e <= n * 64]


def test_documents_packing_positions_and_labels(world, tok, tmp_path):
    data = build_dataset(text_cfg(world, tmp_path), tok)
    ids, labels, pos = data.batch(torch.arange(len(data)))
    after_eos = torch.zeros_like(ids, dtype=torch.bool)
    after_eos[:, 1:] = ids[:, :-1] == tok.eos_token_id
    # a document starts after each EOS (and at each row start): positions restart there
    assert torch.equal(pos == 0, after_eos | (torch.arange(64) == 0))
    assert torch.equal(pos[:, 1:][~after_eos[:, 1:]], pos[:, :-1][~after_eos[:, 1:]] + 1)
    # no loss on a document's first token, and only there (column 0 is never a target)
    assert torch.equal((labels == IGNORE)[:, 1:], after_eos[:, 1:])


def test_pad_packing_one_document_per_row(world, tok, tmp_path):
    cfg = text_cfg(world, tmp_path, packing="pad", seq_len=256)
    data = build_dataset(cfg, tok)
    assert len(data) == 300
    ids, labels, pos = data.batch(torch.arange(300))
    texts = [json.loads(l)["text"] for l in (world / "data/pretrain.jsonl").read_text().splitlines()[:300]]
    lengths = []
    for row, text in enumerate(texts):
        want = (tok(text)["input_ids"] + [tok.eos_token_id])[:256]  # truncated, or padded without loss
        assert ids[row, : len(want)].tolist() == want and labels[row, : len(want)].tolist() == want
        assert (labels[row, len(want):] == IGNORE).all()
        lengths.append(len(want))
    assert pos is None and min(lengths) < 256 and max(lengths) == 256  # both cases occur


def test_second_build_is_a_cache_hit_and_corrupt_entries_are_rebuilt(world, tok, tmp_path):
    logs = []
    first = build_dataset(text_cfg(world, tmp_path), tok, log=logs.append)
    assert len(logs) == 2 and "built" in logs[0] and "tokens/s" in logs[0] and "rows used" in logs[1]
    # another seq_len or packing=concat reuses the same tokens: nothing is tokenized again
    again = build_dataset(text_cfg(world, tmp_path, seq_len=32, packing="concat"), tok, log=logs.append)
    assert "cache hit" in logs[2] and "nothing to tokenize" in logs[2]
    texts = [json.loads(l)["text"] for l in (world / "data/pretrain.jsonl").read_text().splitlines()[:300]]
    tokens = sum(len(tok(t)["input_ids"]) + 1 for t in texts)  # each document and its EOS
    assert len(again) == tokens // 32
    [entry] = [p for p in tmp_path.iterdir() if p.is_dir()]
    want = first.batch(torch.arange(len(first)))[0]
    flags = entry / "flags.bin"
    for damage in ("flip", "truncate", "manifest"):
        if damage == "flip":  # same size, other bytes: only the checksum notices
            b = bytearray(flags.read_bytes())
            b[100] ^= 0xFF
            flags.write_bytes(bytes(b))
        elif damage == "truncate":
            flags.write_bytes(flags.read_bytes()[:-10])
        else:
            (entry / "manifest.json").unlink()
        logs.clear()
        data = build_dataset(text_cfg(world, tmp_path), tok, log=logs.append)
        assert "incomplete or corrupt: rebuilding" in logs[0] and "built" in logs[1], (damage, logs)
        assert torch.equal(data.batch(torch.arange(len(data)))[0], want)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    # the key follows the content: touching the file makes a new entry
    src = tmp_path / "copy.jsonl"
    shutil.copy(world / "data/pretrain.jsonl", src)
    cfg = DataConfig(sources=[DataSource(path=str(src), max_rows=300)], seq_len=64, cache_dir=str(tmp_path), num_proc=1)
    build_dataset(cfg, tok, log=logs.append)
    with open(src, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    logs.clear()
    build_dataset(cfg, tok, log=logs.append)
    assert "built" in logs[0]


def test_waiting_ranks_map_the_entry_the_builder_wrote(world, tok, tmp_path):
    """Real flocks between a builder and two waiting ranks (separate lock descriptions)."""
    cfg = DataConfig(sources=[DataSource(path=str(world / "data/pretrain.jsonl"), max_rows=1200)],
                     seq_len=64, cache_dir=str(tmp_path), num_proc=2)
    got, logs = {}, []

    def rank(name, builder):
        data = build_dataset(cfg, tok, builder=builder, log=logs.append)
        got[name] = data.batch(torch.arange(len(data)))[0]

    waiters = [threading.Thread(target=rank, args=(f"w{i}", False)) for i in range(2)]
    for t in waiters:
        t.start()  # they start first and find nothing
    rank("builder", True)
    for t in waiters:
        t.join(timeout=120)
    assert len(logs) == 2 and "built" in logs[0] and "rows used" in logs[1]  # waiting ranks neither build nor log
    assert torch.equal(got["w0"], got["builder"]) and torch.equal(got["w1"], got["builder"])


def test_sampler_is_independent_of_world_size_and_resumable():
    a = StepSampler(100, 8, seed=3, shuffle=True)
    steps = [a.next_step() for _ in range(30)]  # crosses epochs (12 steps per epoch)
    assert a.pos.epoch == 2
    # the union of rank/micro slices is the global batch, for any split
    for world, accum in [(1, 1), (2, 1), (2, 2), (4, 2)]:
        parts = [m for r in range(world) for m in micro_batches(steps[0], r, world, accum)]
        assert torch.equal(torch.cat(parts), steps[0])
    b = StepSampler(100, 8, seed=3, shuffle=True)
    for _ in range(17):
        b.next_step()
    c = StepSampler(100, 8, seed=3, shuffle=True)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(c.next_step(), s) for s in steps[17:])


def test_weighted_mixing_proportions_epochs_and_resume():
    sizes, weights = [10, 1000, 300], [1.0, 2.0, 1.0]
    a = build_sampler(sizes, weights, 16, seed=5, shuffle=True)
    assert isinstance(a, MixSampler)
    steps = [a.next_step() for _ in range(50)]  # 800 samples
    src = np.searchsorted([0, 10, 1010, 1310], torch.cat(steps).numpy(), side="right") - 1
    assert np.bincount(src).tolist() == [200, 400, 200]
    # the small source cycles: 20 full passes, each a permutation of its 10 rows
    first = torch.cat(steps).numpy()[src == 0]
    assert all(sorted(first[i : i + 10]) == list(range(10)) for i in range(0, 200, 10))
    assert a.epochs() == {"data/epoch": 0, "data/epoch/0": 20, "data/epoch/1": 0, "data/epoch/2": 0}
    b = build_sampler(sizes, weights, 16, seed=5, shuffle=True)
    for _ in range(23):
        b.next_step()
    c = build_sampler(sizes, weights, 16, seed=5, shuffle=True)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert all(torch.equal(c.next_step(), s) for s in steps[23:])
    with pytest.raises(UserError, match="sets no weights"):
        build_sampler(sizes, [None] * 3, 16, seed=5, shuffle=True).load_state_dict(b.state_dict())


def test_global_batch_larger_than_dataset():
    with pytest.raises(UserError, match="larger than the dataset"):
        StepSampler(10, 16, seed=0, shuffle=True)


def test_missing_file_and_column(tmp_path, tok):
    cfg = dict(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"data.sources\[0\].path: no such file or folder"):
        build_dataset(DataConfig(sources=[DataSource(path=str(tmp_path / "nope.jsonl"))], **cfg), tok)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(UserError, match=r"has no column 'text' \(columns: content\)"):
        build_dataset(DataConfig(sources=[DataSource(path=str(f))], **cfg), tok)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


# flex_attention: transformers turns the packed position ids into a document BlockMask (the kernel
# a CUDA run can pick for packed documents: model.attn_implementation=flex_attention)
@pytest.mark.parametrize("attn", ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_a_document_inside_a_packed_row_has_its_logits_alone(world, tok, tmp_path, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world / "model", dtype=torch.float32, attn_implementation=attn).eval()
    data = build_dataset(text_cfg(world, tmp_path, seq_len=512), tok)
    ids, _, pos = data.batch(torch.arange(2))
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        crossing = model(input_ids=ids, use_cache=False).logits  # concat: attends across documents
    checked = 0
    for r in range(2):
        starts = (pos[r] == 0).nonzero().flatten().tolist() + [512]
        for s, e in zip(starts[:-1], starts[1:]):
            with torch.no_grad():
                alone = model(input_ids=ids[r : r + 1, s:e], use_cache=False).logits[0]
            # measured at most 4.8e-7 (fp32; a document alone is a shorter matmul that the BLAS
            # blocks differently); 1e-5 leaves room for other CPUs, far below a leak across documents
            assert (packed[r, s:e] - alone).abs().max() <= 1e-5
            if s > 0:
                # the test can tell: attending across documents moves these logits by 0.95 to 1.06
                assert (crossing[r, s:e] - alone).abs().max() > 0.5
                checked += 1
    assert checked == 4  # documents that start inside the two rows


def test_prefetcher_gives_the_step_its_own_rows_and_leaves_the_sampler_alone(world, tok, tmp_path):
    from qat.data import Prefetcher

    data = build_dataset(text_cfg(world, tmp_path), tok)
    sampler, ref = StepSampler(len(data), 8, 1, True), StepSampler(len(data), 8, 1, True)
    pre = Prefetcher(data, torch.device("cpu"), rank=1, world=2, accum=2)
    try:
        for _ in range(len(data) // 8 + 3):  # crosses an epoch boundary
            got = pre.step_batches(sampler.next_step(), sampler)
            want = [data.batch(i) for i in micro_batches(ref.next_step(), 1, 2, 2)]
            assert sampler.state_dict() == ref.state_dict()  # the look-ahead did not move it
            assert len(got) == 2 and all(torch.equal(g, w) for gb, wb in zip(got, want) for g, w in zip(gb, wb))
        assert pre._pending is not None and pre._pending[1].result()  # the next step is already loaded
    finally:
        pre.close()


