"""The run folder (`output_dir`) of a training run: who writes it, where to resume, what it holds.

    <output_dir>/run.lock        the writer's lock (qat/runlock.py), held by rank 0 for the whole run
    <output_dir>/config.yaml     the resolved config
    <output_dir>/metrics.jsonl   one line per logged step (qat/loggers.py)
    <output_dir>/checkpoints/    step-NNNNNN folders (qat/checkpoint.py), or checkpoint.dir
    <output_dir>/done.json       written at the last step: the run is finished
    <output_dir>/STOP            a stop request (qat/stop.py)
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from qat import checkpoint as ckpt
from qat import runlock
from qat.atomic import write_text_atomic
from qat import peers
from qat.distributed import cleanup, decide_on_rank0, restarted
from qat.errors import PeerLost, UserError


def checkpoint_root(output_dir: str, checkpoint_dir: Optional[str]) -> Path:
    return Path(checkpoint_dir or Path(output_dir) / "checkpoints")


def claim(output_dir: Path, ckpt_root: Path, resume: Optional[str]):
    """Rank 0 takes the run lock of output_dir, then picks the checkpoint to resume (after a
    torchrun restart: the newest, qat.distributed.restarted).

    Both before anything is written, and both decided once: every rank receives rank 0's answer,
    or raises rank 0's UserError. Returns (the lock on rank 0 / a no-op elsewhere, resume path).
    """
    held = []

    def on_rank0():
        held.append(runlock.acquire(Path(output_dir)))
        for line in ckpt.clean_partial(ckpt_root):  # safe now: no other writer
            print(f"checkpoints: {line} (left by a save that was killed)", flush=True)
        return ckpt.resolve_resume(resume, ckpt_root, restarted())

    try:
        resume_from = decide_on_rank0(on_rank0)
    except UserError:
        for lock in held:
            lock.release()
        raise
    return (held[0] if held else contextlib.nullcontext()), resume_from


def lost_peer_message(lost: str, ckpt_root: Path, step: Optional[int]) -> str:
    """What a survivor says when a peer is gone (qat/peers.py names it): where training stopped
    and how it continues, from the newest complete checkpoint."""
    from qat.torchrun_errors import restarts_left

    found = ckpt.list_checkpoints(ckpt_root)
    when = "during set-up" if step is None else f"after step {step}"
    if restarts_left():
        then = f"torchrun restarts the workers, which resume from {found[-1] if found else 'step 0'} by themselves"
    elif found:
        then = (f"rerun the same command with checkpoint.resume=auto to continue from {found[-1]}, the newest "
                f"complete checkpoint")
    else:
        then = f"no checkpoint is complete yet in {ckpt_root}: rerun the same command with checkpoint.resume=auto"
    return f"lost {lost}, {when}. {then[0].upper()}{then[1:]}"


def prepare(run_dir: Path, config_yaml: str, resumed_step: int, total_steps: int) -> None:
    """Rank 0, once the resume step is known: the config, the metrics of steps not redone, and the
    run marked unfinished again when it continues past an earlier end."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", config_yaml)
    truncate_metrics(run_dir / "metrics.jsonl", resumed_step)
    if resumed_step < total_steps:
        (run_dir / ckpt.DONE).unlink(missing_ok=True)
    slurm = os.environ.get("SLURM_RESTART_COUNT")
    if resumed_step or slurm or restarted():
        torchrun = " after a torchrun restart" if restarted() else ""
        print(f"resumed at step {resumed_step}{torchrun} (SLURM_RESTART_COUNT={slurm or 0})", flush=True)


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint: they are about to be redone."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= keep_through_step]
    write_text_atomic(path, "".join(l + "\n" for l in lines))


@contextlib.contextmanager
def lost_peer_is_one_line(ckpt_root, current_step):
    """Around an entry point's distributed work: the process group is torn down at the end; a peer
    lost on the way becomes one PeerLost line naming it and the checkpoint to resume from
    (`current_step()`: where training stopped), without the teardown, which could wait for it."""
    try:
        yield
    except Exception as e:
        lost = peers.lost_peer(e, dist.get_rank()) if dist.get_world_size() > 1 else None
        if lost is None:
            cleanup()
            raise
        raise PeerLost(lost_peer_message(lost, ckpt_root, current_step())) from None
    cleanup()
