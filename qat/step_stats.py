"""What the training loop logs, kept on the device until a step is read.

Each step's loss sums and gradient norm stay where they were computed; they are summed over ranks
only when the loop reads them (a log step, a checkpoint, the end), so in between the host never
waits for the device. Throughput is measured over the steps since the last read, after the device
finished them: a step's own host time says nothing once the host runs ahead of the device.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist


class StepStats:
    def __init__(self, device: torch.device, tokens_per_step: int, distill: bool):
        self.device, self.tokens_per_step, self.distill = device, tokens_per_step, distill
        self.sums: Optional[torch.Tensor] = None  # this rank's loss, ce, kd sums of the last step
        self.tokens = self.grad_norm = None  # global supervised tokens, global gradient norm (device)
        self.data_s = 0.0
        self.steps, self.since = 0, time.perf_counter()

    def fetch(self, loader) -> tuple[list, float]:
        """A step's batches, and the seconds the host waited for them (what prefetching did not hide).
        The step starts here: the device's peak memory counts from now."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        batches = loader.next_batches()
        return batches, time.perf_counter() - t0

    def record(self, sums: torch.Tensor, tokens: torch.Tensor, grad_norm: torch.Tensor, data_s: float) -> None:
        self.sums, self.tokens, self.grad_norm, self.data_s = sums, tokens, grad_norm, data_s
        self.steps += 1

    def read(self) -> dict:
        """Collective (every rank calls it at the same step): the last step's metrics, and the
        throughput since the previous read."""
        sums = self.sums.clone()
        dist.all_reduce(sums)
        sums, tokens, norm = sums.tolist(), float(self.tokens), float(self.grad_norm)  # waits for the device
        now = time.perf_counter()
        step_s = (now - self.since) / max(self.steps, 1)
        self.steps, self.since = 0, now
        m = {"train/loss": sums[0] / tokens, "train/grad_norm": norm, "train/tokens": tokens,
             "perf/tokens_per_sec": self.tokens_per_step / step_s, "perf/step_time_s": step_s,
             "perf/data_s": self.data_s}  # the last step's wait for its batches, that prefetching did not hide
        if self.distill:
            m["train/ce_loss"], m["train/kd_loss"] = sums[1] / tokens, sums[2] / tokens
        return m
