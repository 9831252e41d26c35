"""A request to stop training cleanly: save a checkpoint after the current step and exit."""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist


class StopFlag:
    """A stop request: SIGUSR1/SIGTERM to a worker, or a STOP file in the run folder.

    The file is what Slurm job scripts use (slurm/train.sbatch): it reaches every rank on every
    node through the shared filesystem, whatever torchrun and srun do with signals. Every rank
    votes after each step (`agreed`), so all ranks stop after the same step.
    """

    def __init__(self, run_dir: Path, group=None):
        self.requested = False
        self.file = Path(run_dir) / "STOP"
        self.group = group
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def poll(self) -> bool:
        return self.requested or self.file.exists()

    def agreed(self) -> bool:
        """Collective, once per step on every rank: whether any rank asked to stop. The vote is a
        CPU tensor reduced on a CPU (gloo) group, so it waits for the other ranks' hosts to reach
        the same step, never for the device's queued work."""
        vote = torch.tensor([float(self.poll())])
        dist.all_reduce(vote, group=self.group)
        return bool(vote.item() > 0)

    def clear(self) -> None:
        self.file.unlink(missing_ok=True)
