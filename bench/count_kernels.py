"""Count the full-size passes of one fake-quantized training step (forward + backward).

    python bench/count_kernels.py                 # the route CUDA runs (Triton), on any machine
    python bench/count_kernels.py --route torch   # the pure-torch reference the CPU runs
    python bench/count_kernels.py --json out.json --schemes 8da4w,intx4-weight-only

A pass is an aten op (or one of our custom ops: a Triton kernel counts once) that reads or writes a
tensor as large as the layer's weight, input or output activation, whichever is smallest: the
memory traffic that makes fake quantization cost more than the matmuls. View ops and bare
allocations launch no kernel and are not counted. A TorchDispatchMode sees every op the step
issues below autograd, on the CPU; `--route triton` sends the quantizers down the path CUDA takes
(the Triton kernels, run by Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 is set here).

Cases, each bf16 as training on a GPU runs, without bias (LLM projections have none):
  linear     one QATLinear 256 -> 192, x [4, 32, 256], weight trained
  lora       peft LoRA (r 8) over a frozen QATLinear base; x needs a gradient (earlier layers)
  lora-once  the same after quantize_frozen_weights (the frozen weight quantized once)
  qkv        three QATLinears (256 -> 256, 64, 64) reading one input, as q/k/v do
Between forward and backward the shared-input cache is cleared, as the rest of a deep model
would evict it. `bf16` is the same step with fake quantization off (a plain Linear's passes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--route", default="triton", choices=("triton", "torch"),
                   help="triton: the path CUDA runs (interpreted on CPU tensors); torch: the CPU reference")
    p.add_argument("--schemes", default="8da4w,intx4-weight-only,intx8-weight-only,8da8w")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--json", help="also write the counts here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.route == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; ignored on CUDA tensors
    import torch

    torch.manual_seed(0)
    rows = []
    for name in args.schemes.split(","):
        for case in ("linear", "lora", "lora-once", "qkv"):
            rows.append(count_case(name, case, args.group_size, args.route))
    print_table(rows, args.route)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"route": args.route, "rows": rows}, f, indent=1)
    return 0


def count_case(scheme_name: str, case: str, group: int, route: str) -> dict:
    import torch

    from qat.schemes import get_scheme

    wfq, afq = get_scheme(scheme_name).fake_quantizers(group)
    layers, step, sizes = build(case, wfq, afq)
    counts = {}
    for label, enabled in (("qat", True), ("bf16", False)):
        if not enabled and any(getattr(m, "weight_quantized", False) for m in layers):
            continue  # the original weight is gone: the bf16 step is the lora case's
        for m in layers:
            m.enabled = enabled
        counter = PassCounter(min(sizes))
        with _route(route), counter.attach(layers):
            step(counter)
        counts[label] = counter
    qat = counts["qat"]
    return {"scheme": scheme_name, "case": case, "layers": len(layers), "passes": qat.total,
            "in_qatlinear": qat.inside, "per_qatlinear": round(qat.inside / len(layers), 2),
            "bf16": counts["bf16"].total if "bf16" in counts else None, "ops": qat.names,
            "bf16_ops": counts["bf16"].names if "bf16" in counts else None}


def build(case: str, wfq, afq):
    """(QATLinears, step(counter), full sizes) of one case."""
    import torch
    import torch.nn as nn

    from qat.fake_quant import QATLinear, quantize_frozen_weights

    bf16 = torch.bfloat16
    x = (torch.randn(4, 32, 256) * 2).to(bf16)

    def qat_linear(out, frozen=False):
        lin = nn.Linear(256, out, bias=False).to(bf16).requires_grad_(not frozen)
        return QATLinear.from_linear(lin, wfq, afq)

    if case == "qkv":
        layers = [qat_linear(256), qat_linear(64), qat_linear(64)]
        sizes = [x.numel()] + [m.weight.numel() for m in layers] + [128 * m.out_features for m in layers]
        return layers, _step(layers, x, lambda xi: [m(xi) for m in layers]), sizes
    if case in ("lora", "lora-once"):
        from peft import LoraConfig, inject_adapter_in_model

        holder = nn.Module()
        holder.proj = nn.Linear(256, 192, bias=False).to(bf16)
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]), holder)
        holder.proj.base_layer = qat_linear(192, frozen=True)
        for p in holder.proj.lora_B.parameters():
            nn.init.normal_(p, std=0.02)  # B starts at zero; give the adapter a real product
        if case == "lora-once":
            quantize_frozen_weights(holder)
        base = holder.proj.base_layer
        return [base], _step([holder], x, lambda xi: [holder.proj(xi)]), [x.numel(), base.weight.numel(), 128 * 192]
    layer = qat_linear(192)
    return [layer], _step([layer], x, lambda xi: [layer(xi)]), [x.numel(), layer.weight.numel(), 128 * 192]


def _step(modules, x, forward):
    import torch

    def step(counter):
        for m in modules:
            m.zero_grad(set_to_none=True)  # a fresh step: no accumulation into earlier gradients
        clear_share()
        xi = x.clone().requires_grad_()
        with counter:
            ys = forward(xi)
        grads = [torch.randn_like(y) for y in ys]
        clear_share()  # the rest of a deep model runs between this forward and its backward
        with counter:
            torch.autograd.backward(ys, grads)

    return step


class _Tracker:
    """Module hooks that mark the ops issued inside a QATLinear, forward and backward."""

    def __init__(self):
        self.depth = 0

    def enter(self, *_):
        self.depth += 1

    def leave(self, *_):
        self.depth -= 1


def PassCounter(threshold: int):
    import contextlib

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    # no kernel: bare allocations, and _unsafe_view (a view whose schema declares no alias)
    alloc = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view"}

    def launches_kernel(func) -> bool:
        if func._schema.name.split("::")[-1] in alloc:
            return False
        returns = func._schema.returns
        return not any(r.alias_info is not None and not r.alias_info.is_write for r in returns)

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.total, self.inside, self.names, self.track = 0, 0, [], _Tracker()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if launches_kernel(func):
                leaves = tree_leaves((args, kwargs, out))
                if any(isinstance(t, torch.Tensor) and t.numel() >= threshold for t in leaves):
                    self.total += 1
                    self.inside += self.track.depth > 0
                    self.names.append(str(func.overloadpacket))
            return out

        @contextlib.contextmanager
        def attach(self, layers):
            hooks = []
            for m in layers:
                hooks += [m.register_forward_pre_hook(self.track.enter), m.register_forward_hook(self.track.leave),
                          m.register_full_backward_pre_hook(self.track.enter),
                          m.register_full_backward_hook(self.track.leave)]
            try:
                yield
            finally:
                for h in hooks:
                    h.remove()

    return Counter()


def clear_share() -> None:
    try:
        from qat.fq_share import clear
    except ImportError:  # a tree before the shared-input cache
        return
    clear()


def _route(name: str):
    import contextlib

    try:
        from qat.fq_op import route
    except ImportError:  # a tree before the fused route: the pure-torch code was the CUDA path too
        return contextlib.nullcontext()
    return route(name)


def print_table(rows: list[dict], route: str) -> None:
    print(f"route: {route}")
    print(f"{'scheme':<20} {'case':<10} {'passes':>6} {'in QATLinear':>12} {'per QATLinear':>13} {'bf16':>5}")
    for r in rows:
        print(f"{r['scheme']:<20} {r['case']:<10} {r['passes']:>6} {r['in_qatlinear']:>12} "
              f"{r['per_qatlinear']:>13} {r['bf16'] if r['bf16'] is not None else '-':>5}")


if __name__ == "__main__":
    sys.exit(main())
