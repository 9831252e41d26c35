"""Load the next step's micro-batches while the current step computes.

A one-thread executor reads the rows from the memory map and builds labels and position ids.
On CUDA it pins the host tensors and copies them with non_blocking=True on a side stream; the
training stream waits on an event before it uses them. So neither the read nor the copy shows
in the step time.

The look-ahead runs on a copy of the sampler: the sampler in the training loop advances only
when a step runs, so a checkpoint's data position never counts a prefetched step. A prefetched
batch is used only if its indices equal the step's; otherwise the step loads it directly. The
rows are the same either way, so prefetching changes no number.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from qat.data.packed import PackedData
from qat.data.sampler import micro_batches
from qat.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class Prefetcher:
    def __init__(self, data: PackedData, device: torch.device, rank: int, world: int, accum: int):
        self.data, self.device, self.rank, self.world, self.accum = data, device, rank, world, accum
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qat-prefetch")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: Optional[tuple[torch.Tensor, Future]] = None

    def _load(self, gidx: torch.Tensor):
        batches = [self.data.batch(idx) for idx in micro_batches(gidx, self.rank, self.world, self.accum)]
        if self.stream is None:
            return batches, None
        with torch.cuda.stream(self.stream):
            out = [tuple(t.pin_memory().to(self.device, non_blocking=True) if t is not None else None for t in b)
                   for b in batches]
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def step_batches(self, gidx: torch.Tensor, sampler) -> list[Batch]:
        """This step's micro-batches on the device; starts loading the next step's."""
        pending, self._pending = self._pending, None
        if pending is not None and torch.equal(pending[0], gidx):
            batches, event = pending[1].result()
        else:
            batches, event = self._load(gidx)
        if event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            for b in batches:  # the side stream allocated them; keep them alive for the main stream
                for t in b:
                    if t is not None:
                        t.record_stream(main)
        state = sampler.state_dict()  # peek at the next step without moving the sampler
        nxt = sampler.next_step()
        sampler.load_state_dict(state)
        self._pending = (nxt, self.pool.submit(self._load, nxt))
        return [tuple(t.to(self.device) if t is not None else None for t in b) for b in batches]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class MemmapLoader:
    """The memory-mapped path behind the training loop's interface (shared with stream.StreamLoader)."""

    def __init__(self, data: PackedData, sampler, device: torch.device, rank: int, world: int, accum: int):
        self.sampler = sampler
        self.prefetch = Prefetcher(data, device, rank, world, accum)

    def next_batches(self) -> list[Batch]:
        return self.prefetch.step_batches(self.sampler.next_step(), self.sampler)

    def epochs(self) -> dict[str, int]:
        return self.sampler.epochs()

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state.get("stream"):
            raise UserError("the checkpoint streamed data.sources; this config memory-maps them: "
                            "resume with streaming=true on every source, or start a new run")
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        self.prefetch.close()
