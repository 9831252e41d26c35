"""Read an offline W&B run file (`run-*.wandb`) into protobuf records, for tests.

The file is a 7-byte header (":W&B", magic, version) followed by LevelDB-log blocks of 32 KiB;
each chunk has a 7-byte header (crc32 4, length 2, type 1), and FIRST/MIDDLE/LAST chunks join
into one record. wandb 0.31 no longer ships a Python reader, so we keep this small one.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK, HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
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
