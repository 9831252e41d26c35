"""torch.compile (fsdp.compile=true) trains the grid eager mode trains: every scheme's fake
quantizers run inside a compiled graph as the opaque op qat::fake_quant (qat/fq_op.py), and give
the eager values and straight-through masks bit for bit on bf16 inputs. One compiled graph covers
all schemes (a cold compile costs tens of seconds on a small CPU)."""

from __future__ import annotations

import torch

from qat.fake_quant import IntxWeight, QATLinear
from qat.schemes import SCHEMES, get_scheme

BF16 = torch.bfloat16


def every_quantizer() -> list:
    """(name, quantizer, weight or activation) of every registered scheme, deduplicated."""
    seen, out = set(), []
    for name, scheme in SCHEMES.items():
        group = 128 if name == "fp8-int4" else 32
        for role, fq in zip(("w", "x"), scheme.fake_quantizers(group)):
            if fq is not None and (fq, role) not in seen:
                seen.add((fq, role))
                out.append((f"{name}.{role}", fq, role))
    return out


def test_every_fake_quantizer_compiled_equals_eager_bitwise():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 512, generator=g) * 0.05).to(BF16)
    x = (torch.randn(4, 32, 512, generator=g) * 2).to(BF16)
    # learned scales (qat.learn_scales): the scale is an argument of the op
    learned, scale = IntxWeight(2, 32), learned_scale(w)
    quantizers = every_quantizer()

    def run_all(w, x, scale):
        outs = [fq(w if role == "w" else x) for _, fq, role in quantizers]
        return outs + [learned(w, scale)]

    eager = run_all(w, x, scale)
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(run_all, fullgraph=True, backend=_inductor_recording(graphs))(w, x, scale)
    names = [n for n, _, _ in quantizers] + ["learned scale"]
    assert len(names) >= 12  # intx 2..8 bits with and without int8 activations, int4 x2, fp8-int4, float8, fp4
    op = (torch.ops.qat.fake_quant, torch.ops.qat.fake_quant.default)
    ops = [n for gm in graphs for n in gm.graph.nodes if n.target in op]
    assert len(ops) == len(names)  # each quantizer is one opaque op in the graph
    for name, (ref, ref_mask), (got, mask) in zip(names, eager, compiled):
        assert got.dtype == ref.dtype and torch.equal(got, ref), name
        assert (mask is None) == (ref_mask is None), name
        assert ref_mask is None or torch.equal(mask, ref_mask), name


def learned_scale(w: torch.Tensor) -> torch.Tensor:
    """A learned scale for 2-bit groups of 32, moved off the rule so that some weights clip."""
    move = torch.empty(w.shape[0], w.shape[1] // 32).uniform_(0.6, 1.4, generator=torch.Generator().manual_seed(1))
    return IntxWeight(2, 32).init_scale(w) * move


def _inductor_recording(graphs: list):
    """Inductor, keeping each FX graph Dynamo hands it (to count the opaque ops)."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    return backend


def test_a_compiled_qat_linear_trains_like_eager_bitwise(eager_and_compiled):
    """Forward and the recomputing straight-through backward of our fake-quantized Linear, compiled:
    the same output and gradients as eager, bit for bit (the matmuls are the same aten kernels;
    the quantizers are the eager ones), for an int8 x int4 and the int4 tinygemm scheme."""
    for name in ("8da4w", "int4-weight-only"):
        torch.manual_seed(0)
        lin = torch.nn.Linear(512, 256, bias=False).to(BF16)
        layer = QATLinear.from_linear(lin, *get_scheme(name).fake_quantizers(32))
        x = (torch.randn(4, 16, 512) * 2).to(BF16)
        gy = (torch.randn(4, 16, 256)).to(BF16)
        (y0, gx0, gw0), (y1, gx1, gw1) = eager_and_compiled(layer, x, gy)
        assert torch.equal(y1, y0) and torch.equal(gx1, gx0) and torch.equal(gw1, gw0), name
        if name == "8da4w":
            assert (gw0 == 0).any()  # clipped weights: the mask is part of what is compared
        torch._dynamo.reset()


def test_a_compiled_qat_linear_on_the_triton_route_trains_like_eager_bitwise(eager_and_compiled):
    """What fsdp.compile=true runs on CUDA: the fused ops (qat::fused_fq, qat::fused_ste) traced
    through their fake impls and autograd formula, here with the kernels in Triton's interpreter.
    Output and gradients equal eager's on the torch route, for a clipping block format (Q4_0,
    with its Q8_0 activations) and one whose kernel first reduces the whole tensor (NVFP4)."""
    from qat.fq_op import route

    for name in ("q4_0", "nvfp4"):
        torch.manual_seed(0)
        lin = torch.nn.Linear(512, 256, bias=False).to(BF16)
        layer = QATLinear.from_linear(lin, *get_scheme(name).fake_quantizers(None))
        x = (torch.randn(4, 16, 512) * 2).to(BF16)
        gy = (torch.randn(4, 16, 256)).to(BF16)
        ref = eager_and_compiled(layer, x, gy)[0]  # eager, torch route
        with route("triton"):
            eager, compiled = eager_and_compiled(layer, x, gy)
        for got in (eager, compiled):
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), name
        torch._dynamo.reset()
        fw, bw = _aot_ops(layer, x, gy)
        assert fw.count("qat.fused_fq.default") == 2 and "qat.fused_ste.default" not in fw, name  # values only
        assert "qat.fused_fq.default" in bw and "qat.fake_quant.default" not in fw + bw, name  # kernels, not eager code
        # the straight-through kernel where the weights clip (Q4_0); NVFP4's gradient passes straight through
        assert ("qat.fused_ste.default" in bw) == (name == "q4_0"), name


def _aot_ops(layer, x, gy) -> tuple[list[str], list[str]]:
    """The ops of the forward and backward graphs AOTAutograd hands the compiler for `layer` on the
    Triton route (run as traced, without Inductor)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    from qat.fq_op import route

    graphs = {}

    def keep(kind):
        def compiler(gm, _):
            graphs[kind] = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep("fw"), bw_compiler=keep("bw"))

    torch._dynamo.reset()
    with route("triton"):
        torch.compile(layer, fullgraph=True, backend=backend)(x.clone().requires_grad_()).backward(gy)
    torch._dynamo.reset()
    return graphs["fw"], graphs["bw"]
