"""Fixtures of the integration tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

BLOCK, HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, buf = 7, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        buf = chunk if kind in (FULL, FIRST) else buf + chunk
        if kind in (FULL, LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec


@pytest.fixture(scope="session")
def wandb_records():
    """Read an offline W&B run file (`run-*.wandb`) into protobuf records.

    The file is a 7-byte header (":W&B", magic, version) followed by LevelDB-log blocks of 32 KiB;
    each chunk has a 7-byte header (crc32 4, length 2, type 1), and FIRST/MIDDLE/LAST chunks join
    into one record. wandb 0.31 no longer ships a Python reader, so we keep this small one.
    """
    return _records


def _probe(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world / "model")
    return tok(["Ada Ash lives in Arden and keeps a cat. Bram Cole works as a baker."], return_tensors="pt")["input_ids"]


def _logits(folder, x):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(x).logits


def _folder_tensors(folder, pattern="model*.safetensors") -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob(pattern)):
        out.update(load_file(f))
    return out


def _assert_same_export(local, sharded, world, shards=2):
    """A sharded convert writes what one process writes: same tensors bit for bit, same configs,
    the same quantized model after from_pretrained, the same verification numbers."""
    for sub, pattern in [("hf", "model*.safetensors"), ("quantized", "model*.safetensors"),
                         ("adapter", "adapter_model.safetensors")]:
        if not (local / sub).exists():
            assert not (sharded / sub).exists()
            continue
        a, b = _folder_tensors(local / sub, pattern), _folder_tensors(sharded / sub, pattern)
        assert set(a) == set(b), (sub, set(a) ^ set(b))
        assert all(torch.equal(a[k], b[k]) for k in a), sub
        if sub != "adapter":
            assert len(list((sharded / sub).glob("model-*-of-*.safetensors"))) == shards
            assert json.loads((local / sub / "config.json").read_text()) == \
                json.loads((sharded / sub / "config.json").read_text())
    x = _probe(world)
    assert torch.equal(_logits(local / "quantized", x), _logits(sharded / "quantized", x))
    ra, rb = (json.loads((d / "verify.json").read_text()) for d in (local, sharded))
    assert rb.pop("sharded")["world_size"] == shards and rb["reload_equal"] is True
    ra.pop("checkpoint"), rb.pop("checkpoint"), ra.pop("memory")
    assert ra == rb


@pytest.fixture(scope="session")
def probe():
    """A short held-out sentence of the tiny world, as input ids."""
    return _probe


@pytest.fixture(scope="session")
def logits():
    """The logits of an exported folder (from_pretrained) on input ids."""
    return _logits


@pytest.fixture(scope="session")
def folder_tensors():
    return _folder_tensors


@pytest.fixture(scope="session")
def assert_same_export():
    return _assert_same_export
