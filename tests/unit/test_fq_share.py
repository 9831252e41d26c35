"""An input that several fake-quantized Linears read (q/k/v, gate/up) is quantized once
(qat/fq_share.py), and sharing changes no bit: outputs and every gradient equal those of layers
that each quantize for themselves, eagerly, under activation checkpointing and compiled."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qat import fq_share
from qat.fake_quant import QATLinear
from qat.fq_op import route
from qat.schemes import get_scheme

BF16 = torch.bfloat16


def qkv(name: str = "8da4w") -> torch.nn.ModuleList:
    torch.manual_seed(0)
    wfq, afq = get_scheme(name).fake_quantizers(32)
    return torch.nn.ModuleList(QATLinear.from_linear(torch.nn.Linear(128, out, bias=False), wfq, afq).to(BF16)
                               for out in (128, 32, 32))


def step(layers, x, gys, ckpt=False, evict=False):
    """(outputs, x's gradient, the weights' gradients) of one training step of the trio; `evict`:
    drop the shared entry between forward and backward, as the rest of a deep model would."""
    layers.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    h = xi * 1.0  # a non-leaf input, as a norm's output is
    run = (lambda t: [m(t) for m in layers])
    ys = checkpoint(run, h, use_reentrant=False) if ckpt else run(h)
    if evict:
        fq_share.clear()
    torch.autograd.backward(ys, gys)
    return [y.detach() for y in ys], xi.grad, [m.weight.grad for m in layers]


def assert_equal(a, b):
    (ya, gxa, gwa), (yb, gxb, gwb) = a, b
    assert all(torch.equal(p, q) for p, q in zip(ya, yb))
    assert torch.equal(gxa, gxb) and all(torch.equal(p, q) for p, q in zip(gwa, gwb))


def inputs():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 8, 128, generator=g) * 2 + 0.3).to(BF16)
    return x, [torch.randn(2, 8, out, generator=g).to(BF16) for out in (128, 32, 32)]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["eager", "checkpointed"])
@pytest.mark.parametrize("evict", [False, True], ids=["kept", "evicted"])
def test_qkv_quantize_their_input_once_and_train_bitwise_as_if_each_did(kernels, ckpt, evict):
    """Forward: q quantizes, k and v reuse. Backward (the Triton route; the torch route computes
    values and masks together there): the three reuse the forward's result, or, once the rest of
    a model evicted it, the first quantizes again and the other two reuse. Under checkpointing the
    recomputed forward reads the saved input: it reuses the entry, or after an eviction quantizes
    once into new memory, whose tensors the backward then unpacks and reuses."""
    layers, (x, gys) = qkv(), inputs()
    with route(kernels):
        with fq_share.disabled():
            alone = step(layers, x, gys, ckpt, evict)
        fq_share.clear()
        before = dict(fq_share.stats)
        shared = step(layers, x, gys, ckpt, evict)
    assert_equal(shared, alone)
    hits, misses = (fq_share.stats[k] - before[k] for k in ("hits", "misses"))
    passes = [(1, 2)]  # forward: (misses, hits)
    if ckpt:
        passes.append((1, 2) if evict else (0, 3))
    if kernels == "triton":
        passes.append((1, 2) if evict and not ckpt else (0, 3))
    assert (misses, hits) == tuple(map(sum, zip(*passes)))
    assert (alone[2][0] == 0).any()  # clipped weights: the masks are part of what is compared


def test_an_in_place_write_between_readers_is_seen():
    """The version counter: after x changes in place, the next reader quantizes the new data."""
    layers, (x, _) = qkv(), inputs()
    fq_share.clear()
    with torch.no_grad():
        h = x.clone()
        layers[0](h)
        h.add_(0.5)
        got = layers[1](h)
        fresh = layers[1](h.clone())  # other memory: quantized on its own
    assert torch.equal(got, fresh)


def test_views_reuse_and_other_data_does_not():
    """A detached alias (what checkpointing unpacks) is the same data and reuses; a different
    tensor, or a slice of the same memory with another shape, quantizes for itself."""
    fq = get_scheme("8da4w").fake_quantizers(32)[1]
    x = torch.randn(4, 64)
    fq_share.clear()
    first = fq_share.shared_values(fq, x)
    assert fq_share.shared_values(fq, x.detach()) is first
    other = fq_share.shared_values(fq, x.clone())
    assert other is not first and torch.equal(other, first)
    half = fq_share.shared_values(fq, x[:2])
    assert torch.equal(half, fq(x[:2])[0])


def test_one_entry_is_kept_and_clear_releases_it():
    fq = get_scheme("8da4w").fake_quantizers(32)[1]
    fq_share.clear()
    first = weakref.ref(fq_share.shared_values(fq, torch.randn(4, 64)))
    second = fq_share.shared_values(fq, torch.randn(4, 64))
    assert first() is None  # the earlier result was dropped when the next input came
    second = weakref.ref(second)
    fq_share.clear()
    assert second() is None


def test_compiled_qkv_share_through_the_compilers_cse_and_equal_eager_bitwise():
    """Under torch.compile the cache steps aside; AOTAutograd's common-subexpression pass merges the
    three identical quantizations of the input: one activation quantization in the compiled
    forward, and the same results as eager, bit for bit (Triton route, as CUDA runs). The graphs
    run as aten ops (Inductor's code generation does not touch the opaque quantizers, and would
    sum x's three gradient contributions in fp32 where eager autograd adds in bf16)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=record, bw_compiler=record, partition_fn=min_cut_rematerialization_partition)
    layers, (x, gys) = qkv(), inputs()
    compiled = copy.deepcopy(layers)
    with route("triton"):
        eager = step(layers, x, gys)
        torch._dynamo.reset()
        fn = torch.compile(lambda t: [m(t) for m in compiled], fullgraph=True, backend=backend)
        xi = x.clone().requires_grad_()
        ys = fn(xi * 1.0)
        torch.autograd.backward(ys, gys)
    assert_equal(([y.detach() for y in ys], xi.grad, [m.weight.grad for m in compiled]), eager)
    fused = torch.ops.qat.fused_fq.default
    assert len([n for n in graphs[0].graph.nodes if n.target is fused]) == 4  # three weights, one input
    torch._dynamo.reset()
