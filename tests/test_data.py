import json

import pytest
import torch

from qat.config import DataConfig, DataSource
from qat.data import IGNORE, StepSampler, build_dataset, micro_batches, tokenize_chat
from qat.errors import UserError


@pytest.fixture(scope="module")
def tok(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world / "model")


def test_chat_loss_only_on_assistant_tokens(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Arden?"},
            {"role": "assistant", "content": "In Norland."}, {"role": "user", "content": "And Brisa?"},
            {"role": "assistant", "content": "Also Norland."}]
    [(ids, labels)] = tokenize_chat([msgs], tok)
    supervised = tok.decode([t for t in labels if t != IGNORE])
    assert supervised == "In Norland.<|end|>\nAlso Norland.<|end|>\n"
    assert len(ids) == len(labels)
    assert tok.decode(ids).startswith("<|bos|><|system|>Be brief.")


def test_text_is_packed_with_eos_between_documents(world, tok):
    ids, labels = build_dataset(DataConfig(sources=[DataSource(path=str(world / "data/pretrain.jsonl"))],
                                           seq_len=64), tok)
    assert ids.shape[1] == 64 and torch.equal(ids, labels)
    assert (ids == tok.eos_token_id).sum() > 0


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


def test_global_batch_larger_than_dataset():
    with pytest.raises(UserError, match="larger than the dataset"):
        StepSampler(10, 16, seed=0, shuffle=True)


def test_missing_file_and_column(tmp_path, tok):
    with pytest.raises(UserError, match=r"data.sources\[0\].path: no such file or folder"):
        build_dataset(DataConfig(sources=[DataSource(path=str(tmp_path / "nope.jsonl"))]), tok)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(UserError, match=r"has no column 'text' \(columns: content\)"):
        build_dataset(DataConfig(sources=[DataSource(path=str(f))]), tok)
