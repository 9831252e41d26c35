"""When fake quantization is on, and what happens at the step it starts.

    schedule = FakeQuantSchedule(model, cfg.qat, scheme, keep_frozen_weights=...)
    for step in ...:
        fq_on = schedule.before_step(step)     # switches, re-inits, quantizes frozen weights once
        ... forward / backward ...
        schedule.after_backward(fq_on)

The state is derived from the step alone (plus what the model holds), so a resume at any step
reproduces it: fake quantization is on from `qat.fake_quant_after_n_steps`; learned scales are
re-initialized from the weights as fine-tuned so far at that step (when it is not 0); LoRA's
frozen base weights are replaced by their fake-quantized values once, when fake quantization is
first on in this process (qat.quantize_frozen_once), since fq(W) never changes after that.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from qat.errors import is_rank0
from qat.fake_quant import quantize_frozen_weights
from qat.learned_scales import fill_unused_grads, reinit_at_start
from qat.model import set_fake_quant
from qat.schemes import Scheme


class FakeQuantSchedule:
    def __init__(self, model: nn.Module, start_step: int, learn_scales: bool, quantize_frozen_once: bool,
                 scheme: Optional[Scheme]):
        self.model, self.start, self.learn_scales, self.scheme = model, start_step, learn_scales, scheme
        self.quantize_once = quantize_frozen_once and scheme is not None

    @classmethod
    def for_run(cls, model: nn.Module, qat_cfg, distill_cfg, scheme: Optional[Scheme]) -> "FakeQuantSchedule":
        """From the qat and distill config sections. A distill.teacher=base forward in a LoRA run
        runs the student with fake quantization off: it needs the original frozen weights."""
        self_teacher = distill_cfg.enabled and distill_cfg.teacher == "base"
        return cls(model, qat_cfg.fake_quant_after_n_steps, qat_cfg.learn_scales,
                   qat_cfg.quantize_frozen_once and not self_teacher, scheme)

    def is_on(self, step: int) -> bool:
        return self.scheme is not None and step >= self.start

    def before_step(self, step: int) -> bool:
        """Set the model up for `step`; returns whether fake quantization is on in it."""
        if self.scheme is None:
            return False
        on = self.is_on(step)
        set_fake_quant(self.model, on)
        if self.learn_scales and step == self.start > 0:
            reinit_at_start(self.model)  # the rule on the weights as fine-tuned so far
        if on and self.quantize_once:
            n = quantize_frozen_weights(self.model)
            self.quantize_once = False
            if is_rank0() and n:
                print(f"qat: {n} frozen weights fake-quantized once, at step {step} (qat.quantize_frozen_once)",
                      flush=True)
        return on

    def after_backward(self, on: bool) -> None:
        """Learned scales get no gradient while fake quantization is off; AdamW needs one anyway."""
        if self.learn_scales and not on:
            fill_unused_grads(self.model)
