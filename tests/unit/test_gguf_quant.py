"""GGUF Q4_0 / Q8_0 numerics: our torch quantizer equals the gguf package's numpy reference bit
for bit (codes, scales and values), and the clipped straight-through mask marks the Q4_0 clamp."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from qat.gguf_quant import GGUFActivationQ8, GGUFWeight, fake_quantize, pack_rows, unpack_rows  # noqa: E402

QTYPE = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def reference(fmt, w: torch.Tensor):
    data = gguf.quants.quantize(w.float().numpy(), QTYPE[fmt])
    return data, torch.from_numpy(gguf.quants.dequantize(data, QTYPE[fmt]))


def adversarial() -> torch.Tensor:
    """Blocks of 32 chosen to sit on the rules' edges."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.zeros(32),                                            # all zeros: d = 0
            torch.cat([torch.tensor([5.0]), torch.zeros(31)]),          # a single outlier
            torch.cat([torch.tensor([-3.0, 3.0]), torch.randn(30, generator=g)]),  # +-max tie: first wins
            torch.cat([torch.tensor([3.0, -3.0]), torch.randn(30, generator=g)]),
            torch.linspace(-1, 1, 32),                                 # negative vs positive extremes
            -torch.linspace(-1, 1, 32),
            torch.arange(-16, 16).float() / 2,                         # Q4_0 ties on x * id + 8.5 = k.5
            torch.arange(-16, 16).float() * (127 / 16) / 127 * 2,      # Q8_0 halves
            (torch.arange(32).float() - 15.5) / 15.5 * 127 / 127,
            torch.full((32,), -2.5),                                    # all equal
            torch.full((32,), 1e-30),                                   # subnormal-size fp16 d
            torch.full((32,), 70000.0)]                                 # d beyond fp16 range
    x = torch.stack(rows)
    halves = (torch.arange(-127, 128).float() + 0.5)[:224].reshape(7, 32)  # code * d + d / 2 for d = 1
    halves[:, 0] = 127.0
    return torch.cat([x, halves])


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
@pytest.mark.parametrize("source", ["random", "adversarial"])
def test_fake_quant_equals_gguf_reference(fmt, source):
    w = torch.randn(1000, 1024, generator=torch.Generator().manual_seed(0)) * 0.02 if source == "random" \
        else adversarial()
    data, ref = reference(fmt, w)
    got, mask = fake_quantize(fmt, w)
    assert torch.equal(got.view(torch.int32), ref.reshape(w.shape).view(torch.int32))
    assert np.array_equal(pack_rows(fmt, w).reshape(-1), data.reshape(-1))


def test_q4_0_mask_marks_the_clamp_at_15():
    # m = -1 (largest magnitude, first): d = 1/8, id = 8; x * 8 + 8.5 >= 16 exactly where x >= 0.9375
    w = torch.tensor([[-1.0, 0.9375, 0.93, 1.0, 0.5] + [0.0] * 27])
    _, mask = fake_quantize("q4_0", w)
    codes, d = unpack_rows("q4_0", pack_rows("q4_0", w))
    assert (~mask).nonzero()[:, 1].tolist() == [1, 3]
    assert codes[0, :5].tolist() == [0, 15, 15, 15, 12]
    assert float(d) == 0.125


def test_q8_0_never_clips_and_rounds_halves_away_from_zero():
    w = torch.tensor([[127.0, 2.5, -2.5, 0.5, -0.5, 1.5] + [0.0] * 26])
    got, mask = fake_quantize("q8_0", w)
    assert bool(mask.all())
    assert got[0, :6].tolist() == [127.0, 3.0, -3.0, 1.0, -1.0, 2.0]


def test_straight_through_gradient_stops_at_clipped_weights():
    from qat.fake_quant import fake_quant_linear

    w = torch.tensor([[-1.0, 0.9375, 0.93, 1.0, 0.5] + [0.0] * 27]).requires_grad_()
    x = torch.full((1, 32), 127.0)  # Q8_0 d = 1: the activations quantize exactly
    fake_quant_linear(x, w, None, GGUFWeight("q4_0"), GGUFActivationQ8()).sum().backward()
    assert w.grad[0, :5].tolist() == [127.0, 0.0, 127.0, 0.0, 127.0] and bool((w.grad[0, 5:] == 127).all())


def test_expert_stack_quantizes_each_row():
    w = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(2))
    got, _ = GGUFWeight("q4_0")(w)
    _, ref = reference("q4_0", w.reshape(24, 64))
    assert torch.equal(got, ref.reshape(3, 8, 64))


def test_bf16_weight_gives_the_bf16_rounding_of_the_values():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    got, _ = GGUFWeight("q8_0")(w)
    _, ref = reference("q8_0", w)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref.reshape(4, 64).bfloat16())
