"""A request to stop training cleanly: save a checkpoint after the current step and exit."""

from __future__ import annotations

import signal
from pathlib import Path


class StopFlag:
    """A stop request: SIGUSR1/SIGTERM to a worker, or a STOP file in the run folder.

    The file is what Slurm job scripts use (slurm/train.sbatch): it reaches every rank on every
    node through the shared filesystem, whatever torchrun and srun do with signals. The training
    loop all-reduces the flag after each step, so all ranks stop after the same step.
    """

    def __init__(self, run_dir: Path):
        self.requested = False
        self.file = Path(run_dir) / "STOP"
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def poll(self) -> bool:
        return self.requested or self.file.exists()

    def clear(self) -> None:
        self.file.unlink(missing_ok=True)
