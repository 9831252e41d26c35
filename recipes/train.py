"""Fine-tune an HF causal LM with FSDP2, optional LoRA (peft) and optional QAT (torchao).

    torchrun --nproc_per_node 8 recipes/train.py --config configs/llama3_2_1b/qat_lora.yaml \\
        optimizer.lr=2e-5 qat.scheme=8da4w qat.group_size=32 output_dir=/scratch/run1

One recipe, four modes: full or LoRA (`lora.enabled`) x bf16 or QAT (`qat.enabled`). Any
`key=value` after the config overrides the YAML; an unknown key or a wrong type fails with the
key's name. Multi-node: add torchrun's `--nnodes N --rdzv_backend c10d --rdzv_endpoint host:port`.
Plain `python recipes/train.py ...` runs as a world of one.

Resume: `checkpoint.resume=auto` continues from the newest complete checkpoint under
`checkpoint.dir` (default <output_dir>/checkpoints), at any world size. SIGUSR1 or SIGTERM makes
every rank finish the current step, save a checkpoint and exit (Slurm preemption).

One writer per run folder: rank 0 holds <output_dir>/run.lock for the whole run, and a second run
on the same folder stops with one line naming the holder (qat/runlock.py). Under torchrun each
worker exits as soon as torchrun itself dies, even by SIGKILL (qat/lifeline.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `torchrun recipes/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # before torch's seconds of imports: a torchrun worker dies with torchrun
    from qat.lifeline import exit_with_launcher

    exit_with_launcher()

import torch
import torch.distributed as dist
import torch.nn.functional as F

from qat import checkpoint as ckpt
from qat import runlock
from qat.atomic import write_text_atomic
from qat.config import TrainConfig, load_config, to_dict, to_yaml
from qat.coverage import coverage as qat_coverage
from qat.coverage import describe as describe_coverage
from qat.data import IGNORE, build_dataset, build_loader, flash_varlen_kwargs
from qat.distill import build_teacher, check_teacher, kd_sum
from qat.distributed import all_reduce_sum, cleanup, decide_on_rank0, init_distributed, pick_device
from qat.errors import UserError, exit_on_user_error
from qat.fake_quant import quantize_frozen_weights
from qat.learned_scales import fill_unused_grads, param_groups, reinit_at_start
from qat.metrics import MetricLogger, device_peak_flops, flops_per_token, init_wandb, mfu
from qat.model import (DTYPES, apply_activation_checkpointing, apply_compile, apply_fsdp, apply_lora,
                       apply_qat, cast_frozen, cast_keep_buffers, count_parameters, fill_from_rank0, load_model, load_tokenizer,
                       qat_backend, set_fake_quant, trainable_parameters)
from qat.optim import build_optimizer, build_scheduler
from qat.progress import progress_bar
from qat.rng import seed_step
from qat.schemes import embedding_quant, get_scheme, same_record


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=1e-4")
    return p.parse_args(argv)


class StopFlag:
    """A stop request: SIGUSR1/SIGTERM to a worker, or a STOP file in the run folder.

    The file is what Slurm job scripts use (slurm/train.sbatch): it reaches every rank on every
    node through the shared filesystem, whatever torchrun and srun do with signals. The loop
    all-reduces the flag after each step, so all ranks stop after the same step.
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


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.output_dir) / "checkpoints")


def claim_run_dir(cfg: TrainConfig):
    """Rank 0 takes the run lock of output_dir (qat/runlock.py), then picks the checkpoint to resume.

    Both before anything is written, and both decided once: every rank receives rank 0's answer,
    or raises rank 0's UserError. Returns (the lock on rank 0 / a no-op elsewhere, resume path).
    """
    held = []

    def on_rank0():
        held.append(runlock.acquire(Path(cfg.output_dir)))
        for line in ckpt.clean_partial(checkpoint_root(cfg)):  # safe now: no other writer
            print(f"checkpoints: {line} (left by a save that was killed)", flush=True)
        return ckpt.resolve_resume(cfg.checkpoint.resume, checkpoint_root(cfg))

    try:
        resume_from = decide_on_rank0(on_rank0)
    except UserError:
        for lock in held:
            lock.release()
        raise
    return (held[0] if held else contextlib.nullcontext()), resume_from


def prepare(cfg: TrainConfig, device: torch.device):
    """Everything that can fail on user input; every rank does it alike, so all raise together."""
    scheme = get_scheme(cfg.qat.scheme) if cfg.qat.enabled else None
    if scheme is not None and qat_backend(cfg.qat, scheme) == "torchao":
        scheme.check_hardware(device)  # our emulated fake quantizers run anywhere
    # torchrun sets RANK before the process group exists; rank 0 fills the others after sharding
    on_meta = cfg.fsdp.init_from_rank0 and os.environ.get("RANK", "0") != "0"
    model = load_model(cfg.model, seq_len=cfg.data.seq_len, on_meta=on_meta)
    check_teacher(cfg.distill, model.config, cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code)
    data = build_dataset(cfg.data, tokenizer, seed=cfg.training.seed)  # tokenizes only what the cache lacks
    torch.manual_seed(cfg.training.seed)  # identical LoRA init on every rank, at any world size
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if scheme is not None:
        apply_qat(model, cfg.qat, scheme)
    return model, tokenizer, data, scheme


def shard(model, cfg: TrainConfig, mesh, device) -> None:
    if cfg.lora.enabled:
        cast_frozen(model, DTYPES[cfg.training.dtype])
    from_rank0 = cfg.fsdp.init_from_rank0 and dist.get_world_size() > 1
    full_state = {}
    if from_rank0 and dist.get_rank() == 0:  # canonical FQNs, before the AC/compile wrappers
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        full_state = get_model_state_dict(model)
    apply_activation_checkpointing(model, cfg.fsdp.activation_checkpointing)
    apply_compile(model, cfg.fsdp.compile)
    apply_fsdp(model, mesh, cfg.fsdp, DTYPES[cfg.training.dtype])
    if from_rank0:
        fill_from_rank0(model, full_state, device)
        del full_state


def setup_run_dir(cfg: TrainConfig, rank: int, resumed_step: int) -> Path:
    run_dir = Path(cfg.output_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
        truncate_metrics(run_dir / "metrics.jsonl", resumed_step)
        if resumed_step < cfg.training.steps:  # a run continued past an earlier end is unfinished again
            (run_dir / ckpt.DONE).unlink(missing_ok=True)
    return run_dir


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint: they are about to be redone."""
    if not path.exists():
        return
    import json

    lines = [l for l in path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= keep_through_step]
    write_text_atomic(path, "".join(l + "\n" for l in lines))


def train_step(model, batches, device, world: int, teacher=None, distill=None) -> tuple[dict, float]:
    """Forward/backward over one step's micro-batches; returns ({"loss", "ce", "kd"} sums of token
    losses, tokens), both global.

    The loss of a step is the mean over every supervised token of the *global* batch. Each
    micro-batch contributes sum(token losses) / global_tokens; FSDP's reduce-scatter averages
    gradients over ranks, so we multiply by `world` to undo that. The result is independent of
    world size and of how the batch is split into micro-batches. With a teacher, the token loss is
    weight * KL + (1 - weight) * CE (qat/distill.py).
    """
    local_tokens = sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels, _ in batches)
    (global_tokens,) = all_reduce_sum([local_tokens], device)
    global_tokens = max(global_tokens, 1.0)
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, ce, kd
    for m, (ids, labels, pos) in enumerate(batches):  # on the device already (Prefetcher)
        # Reduce-scatter gradients only after the last micro-batch of the step.
        model.set_requires_gradient_sync(m == len(batches) - 1)
        teacher_hidden = teacher.hidden(ids, pos) if teacher is not None else None
        logits = model(input_ids=ids, position_ids=pos, use_cache=False, **flash_varlen_kwargs(model, pos)).logits
        # KL only (the default): cross-entropy is for the log, so it keeps no graph for backward
        with torch.set_grad_enabled(teacher is None or distill.weight < 1):
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                 ignore_index=IGNORE, reduction="sum")
        loss, kd = ce, torch.zeros((), device=device)
        if teacher is not None:
            weight, bias = teacher.head_params()
            kd = kd_sum(logits, teacher_hidden, weight, bias, labels, distill.temperature, distill.chunk_size,
                        teacher.softcap)
            loss = kd if distill.weight == 1 else distill.weight * kd + (1 - distill.weight) * ce
        (loss * world / global_tokens).backward()
        sums += torch.stack([loss.detach(), ce.detach(), kd.detach()]).double()
    total, ce_total, kd_total = all_reduce_sum(sums.tolist(), device)
    return {"loss": total, "ce": ce_total, "kd": kd_total}, global_tokens


def load_teacher_copy(path, cfg: TrainConfig, mesh, device):
    """A frozen teacher sharded like the student, stored in the compute dtype (it needs no fp32
    master weights). path None: the starting model."""
    from qat.config import ModelConfig

    model_cfg = cfg.model if path is None else ModelConfig(path=path, trust_remote_code=cfg.model.trust_remote_code,
                                                           attn_implementation=cfg.model.attn_implementation)
    teacher = load_model(model_cfg, seq_len=cfg.data.seq_len).requires_grad_(False).eval()
    cast_keep_buffers(teacher, DTYPES[cfg.training.dtype])
    apply_fsdp(teacher, mesh, cfg.fsdp, DTYPES[cfg.training.dtype])
    return teacher


def clip_gradients(params, max_norm) -> float:
    if max_norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return float(norm)


def checkpoint_meta(cfg, step, loader, scheduler, scheme, world, loss, train_time_s, coverage) -> dict:
    return {"step": step, "data": loader.state_dict(), "scheduler": scheduler.state_dict(),
            "train_time_s": round(train_time_s, 3),
            "qat": scheme_record(cfg, scheme), "qat_coverage": coverage,
            "lora": to_dict(cfg.lora) if cfg.lora.enabled else None, "model_path": cfg.model.path,
            "world_size": world, "seed": cfg.training.seed, "loss": loss, "config": to_dict(cfg)}


def scheme_record(cfg: TrainConfig, scheme):
    if scheme is None:
        return None
    q = cfg.qat
    rec = scheme.record(q.group_size, embedding_quant(q.embedding, q.embedding_bits, q.embedding_group_size, scheme))
    return {**rec, "learned_scales": True} if q.learn_scales else rec


def check_resume_matches(meta: dict, cfg: TrainConfig, scheme) -> None:
    want = scheme_record(cfg, scheme)
    if not same_record(meta.get("qat"), want):
        raise UserError(f"the checkpoint was trained with qat={meta.get('qat')}, this config asks for {want}")
    if bool(meta.get("lora")) != cfg.lora.enabled:
        raise UserError(f"the checkpoint has lora={bool(meta.get('lora'))}, this config lora.enabled={cfg.lora.enabled}")


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = pick_device(cfg.fsdp.device)
    mesh = init_distributed(device)
    try:
        lock, resume_from = claim_run_dir(cfg)
        with lock:  # released when training ends in any way; SIGKILL: by the kernel
            model, tokenizer, data, scheme = prepare(cfg, device)
            run(cfg, device, mesh, model, data, scheme, resume_from)
    finally:
        cleanup()


def run(cfg, device, mesh, model, data, scheme, resume_from) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt_root = checkpoint_root(cfg)
    stop = StopFlag(Path(cfg.output_dir))
    coverage = qat_coverage(model) if scheme is not None else None
    if rank == 0 and coverage is not None:
        print(describe_coverage(coverage), flush=True)
    shard(model, cfg, mesh, device)
    teacher = None
    if cfg.distill.enabled:
        teacher = build_teacher(cfg.distill, model, cfg.lora.enabled,
                                lambda path: load_teacher_copy(path, cfg, mesh, device))
    params = trainable_parameters(model)
    optimizer = build_optimizer(param_groups(model, cfg.optimizer.lr, cfg.qat.scale_lr_multiplier), cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.training.steps)
    t = cfg.training
    loader = build_loader(data, cfg.data, t, device, rank, world)  # memory-mapped rows or a stream
    start, loss, time_before = 0, float("nan"), 0.0
    if resume_from is not None:
        meta = ckpt.load(resume_from, model, optimizer, adapter_only=cfg.lora.enabled)
        check_resume_matches(meta, cfg, scheme)
        scheduler.load_state_dict(meta["scheduler"])
        loader.load_state_dict(meta["data"])
        start, loss, time_before = meta["step"], meta.get("loss", loss), meta.get("train_time_s", 0.0)
    run_dir = setup_run_dir(cfg, rank, start)
    if rank == 0 and (start or os.environ.get("SLURM_RESTART_COUNT")):
        print(f"resumed at step {start} (SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT', 0)})", flush=True)
    logger, bar = None, None
    n_all, n_train = count_parameters(model)
    if rank == 0:
        wb = init_wandb(cfg.logging.wandb, run_dir, to_dict(cfg), job_type="train", name=run_dir.name)
        logger = MetricLogger(run_dir, wb)
        logger.summary({"params/total": n_all, "params/trainable": n_train,
                        "slurm/restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0))})
        if cfg.logging.progress_bar:
            bar = progress_bar(t.steps, "train", initial=start)
    hf_cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    emb = hf_cfg.vocab_size * hf_cfg.hidden_size
    fpt = flops_per_token(n_all - emb if not hf_cfg.tie_word_embeddings else n_all, hf_cfg.num_hidden_layers,
                          hf_cfg.hidden_size, cfg.data.seq_len, cfg.lora.enabled)
    peak = device_peak_flops(device)
    end = t.steps if t.stop_after_steps is None else min(t.steps, start + t.stop_after_steps)
    step, launched = start, time.perf_counter()
    # a distill.teacher=base forward in a LoRA run needs the original frozen weights
    quantize_once = cfg.qat.quantize_frozen_once and not (cfg.distill.enabled and cfg.distill.teacher == "base")
    try:
        while step < end:
            seed_step(t.seed, step, rank)
            fq_on = scheme is not None and step >= cfg.qat.fake_quant_after_n_steps
            if scheme is not None:
                set_fake_quant(model, fq_on)
                if cfg.qat.learn_scales and step == cfg.qat.fake_quant_after_n_steps > 0:
                    reinit_at_start(model)  # the rule on the weights as fine-tuned so far
                if fq_on and quantize_once:
                    n = quantize_frozen_weights(model)
                    quantize_once = False
                    if rank == 0 and n:
                        print(f"qat: {n} frozen weights fake-quantized once, at step {step} (qat.quantize_frozen_once)",
                              flush=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            batches = loader.next_batches()
            data_s = time.perf_counter() - t0  # the wait the prefetcher (or the stream's thread) did not hide
            sums, n_tok = train_step(model, batches, device, world, teacher, cfg.distill)
            if cfg.qat.learn_scales and not fq_on:
                fill_unused_grads(model)
            grad_norm = clip_gradients(params, t.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = sums["loss"] / n_tok
            (stop_votes,) = all_reduce_sum([float(stop.poll())], device)  # also syncs the device
            dt = time.perf_counter() - t0
            tps = t.batch_size * world * t.gradient_accumulation_steps * cfg.data.seq_len / dt
            if rank == 0 and (step % cfg.logging.log_every_n_steps == 0 or step == end):
                m = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                     "train/tokens": n_tok, "perf/tokens_per_sec": tps, "perf/step_time_s": dt,
                     "perf/data_s": data_s,
                     "qat/fake_quant_enabled": int(fq_on), **loader.epochs()}
                if teacher is not None:
                    m["train/ce_loss"], m["train/kd_loss"] = sums["ce"] / n_tok, sums["kd"] / n_tok
                if peak:
                    m["perf/mfu"] = mfu(tps, fpt, peak, world)
                if device.type == "cuda":
                    m["mem/peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log(step, m)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            every = cfg.checkpoint.every_n_steps
            if stop_votes > 0 or step == end or (every and step % every == 0):
                meta = checkpoint_meta(cfg, step, loader, scheduler, scheme, world, loss,
                                       time_before + time.perf_counter() - launched, coverage)
                path = ckpt.save(ckpt_root, step, model, optimizer, meta, cfg.checkpoint.keep_last,
                                 adapter_only=cfg.lora.enabled)
                if rank == 0 and bar is not None:
                    bar.write(f"saved {path}")
            if stop_votes > 0:
                if rank == 0:
                    stop.clear()
                    print(f"stop requested: checkpoint at step {step} saved, exiting", flush=True)
                break
        if rank == 0 and step == t.steps:
            ckpt.write_done(run_dir, {"step": step, "loss": loss, "scheme": scheme_record(cfg, scheme),
                                      "train_time_s": round(time_before + time.perf_counter() - launched, 3),
                                      "world_size": world})
    finally:
        loader.close()
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.summary({"train/final_loss": loss, "train/steps": step})
            logger.close()


if __name__ == "__main__":
    main()
