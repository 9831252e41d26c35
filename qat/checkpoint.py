"""Sharded, atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of `<dir>/step-NNNNNN/`:
    .metadata, __*_*.distcp   DCP shards: model (or only the adapter for LoRA) + optimizer
    meta.json                 step, data position, LR schedule, QAT scheme record, world size,
                              seed, the resolved config

A save writes `<dir>/.tmp-step-NNNNNN/` and renames it once every rank has written its shards
and rank 0 has written meta.json, so a folder named `step-*` with both files is always complete:
a job killed mid-save leaves the previous checkpoint untouched. DCP stores DTensor shards with
their global layout, so a checkpoint written at world size 2 loads at world size 1 and back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from qat.atomic import write_text_atomic
from qat.distributed import decide_on_rank0
from qat.errors import UserError
from qat.iofaults import writing
from qat.schemes import same_record

STEP_RE = re.compile(r"^step-(\d{6,})$")
META = "meta.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    return STEP_RE.match(path.name) is not None and (path / META).is_file() and (path / ".metadata").is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint, or a UserError saying why the folder is not one."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        missing = [f for f in (META, ".metadata") if not (path / f).is_file()]
        raise UserError(f"{path} is not a complete checkpoint (missing {', '.join(missing) or 'a step-NNNNNN name'})")
    try:
        return json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {path} is corrupt: {META} does not parse ({e})") from None


def resolve_resume(resume: Optional[str], root: Path, restarted: bool = False) -> Optional[Path]:
    """None (fresh start), the newest complete checkpoint for 'auto', or a validated explicit path.

    A fresh start into a folder that already holds checkpoints is refused: it would prune them.
    `restarted`: torchrun restarted this job's workers (`--max-restarts`); whatever `resume` says,
    the run continues its own progress, the newest complete checkpoint, if it saved any yet.
    Training calls this on rank 0 only and shares the answer (qat.distributed.decide_on_rank0).
    """
    found = list_checkpoints(root)
    if restarted and found:
        return found[-1]
    if resume is None:
        if found:
            raise UserError(f"{root} already holds checkpoints; set checkpoint.resume=auto to continue that run, "
                            f"or choose another output_dir")
        return None
    if resume == "auto":
        return found[-1] if found else None
    read_meta(Path(resume))
    return Path(resume)


def clean_partial(root: Path) -> list[str]:
    """Remove what a save killed midway left behind; returns what it did, for the log.

    Only the holder of the run lock may call it (qat/runlock.py): another live writer's .tmp-
    folder would look just the same. A `.old-step-N` is a complete checkpoint that was being
    replaced; if the kill came between the two renames, there is no `step-N` and it goes back.
    """
    root, done = Path(root), []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        m = re.match(r"^\.(tmp|old)-(step-\d{6,})$", p.name)
        if not (m and p.is_dir()):
            continue
        final = root / m.group(2)
        if m.group(1) == "old" and not final.exists() and (p / META).is_file() and (p / ".metadata").is_file():
            os.replace(p, final)
            done.append(f"restored {final.name} from {p.name}")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}")
    return done


def _options(adapter_only: bool) -> StateDictOptions:
    # For LoRA the frozen base weights come from model.path again; only adapters are saved.
    return StateDictOptions(ignore_frozen_params=adapter_only, strict=not adapter_only)


def save(root: Path, step: int, model, optimizer, meta: dict, keep_last: int, adapter_only: bool) -> Path:
    """Collective: every rank calls it. Returns the final folder.

    A write the filesystem refuses (a full disk, a read-only or vanished mount) on any rank becomes
    one UserError on every rank: DCP gathers every rank's failure, and rank 0's own steps go through
    decide_on_rank0. The partial `.tmp-step-N` folder is removed and the complete checkpoints are
    untouched, so `checkpoint.resume=auto` still takes the newest of them."""
    final, tmp = step_dir(root, step), Path(root) / f".tmp-step-{step:06d}"
    hint = f"the complete checkpoints in {root} are unchanged and checkpoint.resume=auto continues from the newest"
    try:
        with writing(tmp, "the checkpoint", hint):
            decide_on_rank0(_fresh_dir, tmp, hint)
            model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(adapter_only))
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
            decide_on_rank0(_publish, tmp, final, meta, keep_last, hint)
    except UserError:
        # every rank has diagnosed its own failure (a full disk is seen on the disk) before the
        # partial folder goes and frees the space
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fresh_dir(tmp: Path, hint: str) -> None:
    with writing(tmp, "the checkpoint", hint):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)


def _publish(tmp: Path, final: Path, meta: dict, keep_last: int, hint: str) -> None:
    """Rank 0: meta.json, then the rename that makes the checkpoint complete, then pruning."""
    with writing(tmp, "the checkpoint", hint):
        write_text_atomic(tmp / META, json.dumps(meta, indent=2, default=str))
        old = final.with_name(f".old-{final.name}")
        if final.exists():  # re-saving a step: two renames, so a kill in between loses nothing complete
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(final.parent)
        prune(final.parent, keep_last)


def load(path: Path, model, optimizer, adapter_only: bool) -> dict:
    """Collective: load shards into the (already sharded) model and optimizer; return meta."""
    meta = read_meta(path)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(adapter_only))
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise UserError(f"checkpoint {path} is corrupt or does not match this model: {_first_failure(e)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(adapter_only))
    return meta


def _first_failure(e: BaseException) -> str:
    """DCP gathers every rank's exception; name the first one in one line."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (exc, _) = next(iter(sorted(e.failures.items(), key=lambda kv: kv[0])))
        return f"rank {rank}: {type(exc).__name__} {str(exc).strip()[:200]}".strip()
    return f"{type(e).__name__} {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}".strip()


def prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_resume(meta: dict, qat_record: Optional[dict], lora: bool) -> None:
    """Refuse to resume a checkpoint trained otherwise than this config asks (scheme, LoRA)."""
    if not same_record(meta.get("qat"), qat_record):
        raise UserError(f"the checkpoint was trained with qat={meta.get('qat')}, this config asks for {qat_record}")
    if bool(meta.get("lora")) != lora:
        raise UserError(f"the checkpoint has lora={bool(meta.get('lora'))}, this config lora.enabled={lora}")


def resume_training(path: Optional[Path], model, optimizer, scheduler, loader, qat_record: Optional[dict],
                    lora: bool) -> tuple[int, float, float]:
    """Load a training checkpoint into the model, optimizer, LR scheduler and data loader; returns
    (step, loss, training seconds so far). path None: a fresh start (0, nan, 0)."""
    if path is None:
        return 0, float("nan"), 0.0
    meta = load(path, model, optimizer, adapter_only=lora)
    check_resume(meta, qat_record, lora)
    scheduler.load_state_dict(meta["scheduler"])
    loader.load_state_dict(meta["data"])
    return meta["step"], meta.get("loss", float("nan")), meta.get("train_time_s", 0.0)


DONE = "done.json"


def write_done(run_dir: Path, record: dict) -> None:
    """The run's completion record, written by the recipe itself when the last step is done, so a run
    launched by hand is recognised as finished as well as one launched by compare or Slurm."""
    write_text_atomic(Path(run_dir) / DONE, json.dumps(record, indent=2))


def read_done(run_dir: Path) -> Optional[dict]:
    """The completion record of a finished run, or None while it is unfinished."""
    path = Path(run_dir) / DONE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); delete it and rerun training with checkpoint.resume=auto") from None
