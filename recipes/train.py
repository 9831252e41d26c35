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

One writer per run folder (run.lock); workers exit with their torchrun launcher; a bad input or a
refused write is one line, exit 2; a lost peer is one line, exit 75, and with `--max-restarts N`
torchrun's restarted workers continue from the newest checkpoint (docs/hardening.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

if __name__ == "__main__":  # before torch's seconds of imports: a torchrun worker dies with torchrun
    from qat.lifeline import exit_with_launcher

    exit_with_launcher()

import torch
import torch.distributed as dist

from qat import checkpoint as ckpt
from qat import run_dir as rundir
from qat.config import TrainConfig, load_config, to_dict, to_yaml
from qat.coverage import describe
from qat.fq_op import describe_route
from qat.data import IGNORE, build_dataset, build_loader, flash_varlen_kwargs
from qat.distill import build_teacher, check_teacher, load_teacher_copy, token_loss_sums
from qat.distributed import Timeouts, control_group, decide_on_rank0, init_distributed, pick_device
from qat.errors import exit_on_user_error
from qat.fake_quant_schedule import FakeQuantSchedule
from qat.learned_scales import param_groups
from qat.loggers import MetricLogger
from qat.model import (DTYPES, apply_lora, apply_qat, count_parameters, load_model, load_tokenizer, our_quantizers,
                       qat_backend, shard_model, trainable_parameters)
from qat.optim import build_optimizer, build_scheduler, clip_grad_norm
from qat.perf import device_peak_flops, mfu, model_flops_per_token
from qat.progress import progress_bar
from qat.rng import seed_step
from qat.schemes import get_scheme, training_record
from qat.step_stats import StepStats
from qat.stop import StopFlag


class TrainRecipe:
    """setup() builds everything in a fixed order; train() runs the loop; both on every rank."""

    def __init__(self, cfg: TrainConfig, device: torch.device, mesh):
        self.cfg, self.device, self.mesh = cfg, device, mesh
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_root = rundir.checkpoint_root(cfg.output_dir, cfg.checkpoint.dir)
        self.scheme = get_scheme(cfg.qat.scheme) if cfg.qat.enabled else None
        self.logger = self.bar = self.step = None
        self.timeouts = Timeouts(cfg.distributed.setup_timeout_s, cfg.distributed.timeout_s)

    def setup(self, resume_from) -> None:
        """Model -> LoRA -> QAT -> AC/compile/FSDP2 -> teacher -> optimizer -> data -> resume -> logs."""
        cfg, dtype = self.cfg, DTYPES[self.cfg.training.dtype]
        if self.scheme is not None and qat_backend(cfg.qat, self.scheme) == "torchao":
            self.scheme.check_hardware(self.device)  # our emulated fake quantizers run anywhere
        # torchrun sets RANK before the process group exists; rank 0 fills the others after sharding
        on_meta = cfg.fsdp.init_from_rank0 and os.environ.get("RANK", "0") != "0"
        model = load_model(cfg.model, seq_len=cfg.data.seq_len, on_meta=on_meta, device=self.device)
        check_teacher(cfg.distill, model.config, cfg.model.trust_remote_code)
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code)
        data = build_dataset(cfg.data, tokenizer, seed=cfg.training.seed)  # tokenizes only what the cache lacks
        torch.manual_seed(cfg.training.seed)  # identical LoRA init on every rank, at any world size
        model = apply_lora(model, cfg.lora) if cfg.lora.enabled else model
        self.coverage = None if self.scheme is None else apply_qat(model, cfg.qat, self.scheme)
        if self.rank == 0 and self.coverage is not None:
            print(describe(self.coverage), flush=True)
            route = describe_route(our_quantizers(model), self.device)
            if route:
                print(route, flush=True)
        shard_model(model, cfg.fsdp, cfg.lora.enabled, self.mesh, self.device, dtype, DTYPES[cfg.training.master_dtype])
        self.model = model
        self.teacher = None if not cfg.distill.enabled else build_teacher(
            cfg.distill, model, cfg.lora.enabled,
            lambda path: load_teacher_copy(path, cfg.model, cfg.data.seq_len, cfg.fsdp, self.mesh, dtype))
        self.params = trainable_parameters(model)
        self.optimizer = build_optimizer(param_groups(model, cfg.optimizer.lr, cfg.qat.scale_lr_multiplier),
                                         cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.training.steps)
        self.loader = build_loader(data, cfg.data, cfg.training, self.device, self.rank, self.world)
        self.step, self.loss, self.time_before = ckpt.resume_training(
            resume_from, model, self.optimizer, self.scheduler, self.loader, training_record(self.scheme, cfg.qat),
            cfg.lora.enabled)
        self.fake_quant = FakeQuantSchedule.for_run(model, cfg.qat, cfg.distill, self.scheme)
        self._open_logs()

    def _open_logs(self) -> None:
        n_all, n_train = count_parameters(self.model)
        self.flops_per_token = model_flops_per_token(self.model, n_all, self.cfg.data.seq_len, self.cfg.lora.enabled)
        self.peak_flops = device_peak_flops(self.device)
        decide_on_rank0(rundir.prepare, self.run_dir, to_yaml(self.cfg), self.step, self.cfg.training.steps)
        if self.rank != 0:
            return
        self.logger = MetricLogger.for_training(self.run_dir, self.cfg.logging.wandb, to_dict(self.cfg), {
            "params/total": n_all, "params/trainable": n_train,
            "slurm/restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0)})
        if self.cfg.logging.progress_bar:
            self.bar = progress_bar(self.cfg.training.steps, "train", initial=self.step)

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over one step's micro-batches; returns this rank's (loss, ce, kd) sums of
        token losses and the global token count, as device tensors (no host sync: StepStats reads them).

        The loss of a step is the mean over every supervised token of the *global* batch: each
        micro-batch contributes sum(token losses) / global_tokens, times `world` to undo the average
        over ranks in FSDP's reduce-scatter. So it does not depend on the world size or on how the
        batch is split into micro-batches.
        """
        model, teacher = self.model, self.teacher
        tokens = torch.stack([(labels[:, 1:] != IGNORE).sum() for _, labels, _ in batches]).sum().double()
        dist.all_reduce(tokens)
        tokens = tokens.clamp_min(1.0)
        scale = self.world / tokens.float()  # exact: a count below 2**24 is an fp32 integer
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss, ce, kd
        for m, (ids, labels, pos) in enumerate(batches):  # on the device already (Prefetcher)
            # Reduce-scatter gradients only after the last micro-batch of the step.
            model.set_requires_gradient_sync(m == len(batches) - 1)
            teacher_hidden = teacher.hidden(ids, pos) if teacher is not None else None
            logits = model(input_ids=ids, position_ids=pos, use_cache=False, **flash_varlen_kwargs(model, pos)).logits
            loss, ce, kd = token_loss_sums(logits, labels, teacher, teacher_hidden, self.cfg.distill)
            (loss * scale).backward()
            sums += torch.stack([loss.detach(), ce.detach(), kd.detach()]).double()
        return sums, tokens

    def train(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        stop = StopFlag(self.run_dir, control_group())
        end = t.steps if t.stop_after_steps is None else min(t.steps, self.step + t.stop_after_steps)
        launched = time.perf_counter()
        self.stats = StepStats(self.device, t.batch_size * self.world * t.gradient_accumulation_steps * cfg.data.seq_len,
                               self.teacher is not None)
        first, fq_was = self.step, None
        try:
            while self.step < end:
                seed_step(t.seed, self.step, self.rank)
                fq_on = self.fake_quant.before_step(self.step)
                self.timeouts.use(long=self.step == first or fq_on != fq_was)  # compiles, then steady
                fq_was = fq_on
                batches, data_s = self.stats.fetch(self.loader)
                sums, tokens = self.train_step(batches)
                self.fake_quant.after_backward(fq_on)
                grad_norm = clip_grad_norm(self.params, t.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.stats.record(sums, tokens, grad_norm, data_s)
                stop_now = stop.agreed()
                every = cfg.checkpoint.every_n_steps
                save = stop_now or (self.step == end and cfg.checkpoint.save_final) or (every and not self.step % every)
                self.log(lr, fq_on, end, read=save)
                if save:
                    self.timeouts.use(long=True)
                    self.save(self.time_before + time.perf_counter() - launched)
                if stop_now:
                    if self.rank == 0:
                        stop.clear()
                        print(f"stop requested: checkpoint at step {self.step} saved, exiting", flush=True)
                    break
            self.finish(self.time_before + time.perf_counter() - launched)
        finally:
            self.close()

    def log(self, lr, fq_on, end, read: bool) -> None:
        """On log steps (and when a checkpoint or the end needs the loss), read the step's numbers:
        the only point where the host waits for the device."""
        if self.bar is not None:
            self.bar.update(1)
        if not (read or self.step % self.cfg.logging.log_every_n_steps == 0 or self.step == end):
            return
        m = self.stats.read()  # collective
        self.loss, tps = m["train/loss"], m["perf/tokens_per_sec"]
        if self.rank != 0:
            return
        m.update({"train/lr": lr, "qat/fake_quant_enabled": int(fq_on), **self.loader.epochs()})
        if self.peak_flops:
            m["perf/mfu"] = mfu(tps, self.flops_per_token, self.peak_flops, self.world)
        if self.device.type == "cuda":
            m["mem/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.logger.log(self.step, m)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")

    def save(self, train_time_s: float) -> None:
        cfg = self.cfg
        meta = {"step": self.step, "data": self.loader.state_dict(), "scheduler": self.scheduler.state_dict(),
                "train_time_s": round(train_time_s, 3), "qat": training_record(self.scheme, cfg.qat),
                "qat_coverage": self.coverage, "lora": to_dict(cfg.lora) if cfg.lora.enabled else None,
                "model_path": cfg.model.path, "world_size": self.world, "seed": cfg.training.seed,
                "loss": self.loss, "config": to_dict(cfg)}
        path = ckpt.save(self.ckpt_root, self.step, self.model, self.optimizer, meta, cfg.checkpoint.keep_last,
                         adapter_only=cfg.lora.enabled)
        if self.rank == 0 and self.bar is not None:
            self.bar.write(f"saved {path}")

    def finish(self, train_time_s: float) -> None:  # the completion record, after the schedule's last step
        if self.rank == 0 and self.step == self.cfg.training.steps:
            ckpt.write_done(self.run_dir, {"step": self.step, "loss": self.loss,
                                           "scheme": training_record(self.scheme, self.cfg.qat),
                                           "train_time_s": round(train_time_s, 3), "world_size": self.world})

    def close(self) -> None:  # however the loop ended
        self.loader.close()
        if self.bar is not None:
            self.bar.close()
        if self.logger is not None:
            self.logger.summary({"train/final_loss": self.loss, "train/steps": self.step})
            self.logger.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=1e-4")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = pick_device(cfg.fsdp.device)
    mesh = init_distributed(device, cfg.distributed.setup_timeout_s)
    ckpt_root = rundir.checkpoint_root(cfg.output_dir, cfg.checkpoint.dir)
    recipe = TrainRecipe(cfg, device, mesh)
    with rundir.lost_peer_is_one_line(ckpt_root, lambda: recipe.step):
        lock, resume_from = rundir.claim(Path(cfg.output_dir), ckpt_root, cfg.checkpoint.resume)
        with lock:  # released when training ends in any way; SIGKILL: by the kernel
            recipe.setup(resume_from)
            recipe.train()


if __name__ == "__main__":
    main()
