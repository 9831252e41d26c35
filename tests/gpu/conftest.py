"""Fixtures of the GPU tests: the helpers of the GPU checks, and what they may claim when CUDA and the CPU compute a quantizer's
scale differently.

torchao's qparams divide by Python floats (absmax / 7.5 for int4, (max - min) / 255 for int8,
absmax / 448 for float8). CUDA divides a tensor by a CPU scalar by multiplying with the scalar's
reciprocal, the CPU divides: an fp32 scale can come out one ulp apart. A value that sits on a
rounding tie of the grid then rounds to the other neighbour; a symmetric group's absmax always sits
on the +-(qmax + 1/2) tie (absmax / (absmax / 7.5) = 7.5), so up to one code per group moves by one
step, and with it that weight's clip decision. In bf16 the scale is rounded to 8 bits after the
division, and q / 7.5, q / 127.5, q / 448 never fall within an fp32 ulp of a bf16 rounding midpoint
(their binary expansions repeat with periods 4, 8 and 3), so bf16 scales and codes are bitwise.
Emulated on the CPU (intx4, group 32, 256x512 weights, every scale one ulp up): 1,434 of 131,072
codes move, all at the 4,097 ties; one ulp down: 436.

The helpers check exactly that and nothing looser; `PinnedToCPU` gives a gradient check identical
fake-quantized operands on both devices, so it measures the backward alone.
"""

from __future__ import annotations

import pytest
import torch


def _within_one_ulp(got: torch.Tensor, ref: torch.Tensor) -> bool:
    up = torch.nextafter(ref, torch.full_like(ref, float("inf")))
    down = torch.nextafter(ref, torch.full_like(ref, -float("inf")))
    return bool(((got == ref) | (got == up) | (got == down)).all())


def _grid_codes(values: torch.Tensor, scale: torch.Tensor, rows: int, gs: int, zero=0) -> torch.Tensor:
    """The integer codes behind fake-quantized values (values = (code - zero) * scale, rounded once)."""
    return torch.round(values.double().reshape(rows, -1, gs) / scale.double().reshape(rows, -1, 1)) + zero


def at_ties(ratio: torch.Tensor) -> torch.Tensor:
    """Where `ratio` (a value over the CPU's scale, plus any zero point, in fp64) lies within 4 fp32
    ulps of a half integer: a one-ulp scale and the two roundings of value * (1 / scale) reach it."""
    band = ratio.abs().clamp(min=1.0) * 2.0 ** -21
    return ((ratio - ratio.floor()) - 0.5).abs() <= band


def _check_codes_at_ties(codes: torch.Tensor, ref_codes: torch.Tensor, ratio: torch.Tensor,
                        max_share: float) -> torch.Tensor:
    """Codes computed with the two devices' scales: equal, or one step apart at a rounding tie, on
    at most `max_share` of the elements. Returns where the ties are (clip decisions may move there)."""
    moved, ties = codes != ref_codes, at_ties(ratio)
    assert bool(((codes - ref_codes).abs() <= 1).all()), "a code moved by more than one step"
    assert bool(ties[moved].all()), "a code moved away from a rounding tie"
    share = float(moved.double().mean())
    assert share <= max_share, share
    return ties


class _PinnedToCPU:
    """A fake quantizer that quantizes on the CPU and hands the result to the caller's device: both
    sides of a CUDA-vs-CPU gradient check then multiply identical operands and masks."""

    def __init__(self, fq):
        self.fq = fq

    def __call__(self, t: torch.Tensor, scale=None, mask: bool = True):
        args = (t.cpu(),) if scale is None else (t.cpu(), scale.cpu())
        out, m = self.fq(*args, mask=mask)
        return out.to(t.device), (m.to(t.device) if m is not None else None)

    def scale_grad(self, w, scale, g_wq):  # learned scales: the LSQ gradient, on the caller's device
        return self.fq.scale_grad(w, scale, g_wq)


def _sample(shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """CPU random data with a few large outliers per row, which stretch the scales as real weights do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    spikes = torch.rand(shape, generator=g) < 0.002
    return torch.where(spikes, x * 20, x).to(dtype)


def _fake_quantizers(name: str):
    """(weight, activation) fake quantizers of a scheme, as QAT builds them (group 32)."""
    from qat.schemes import get_scheme

    return get_scheme(name).fake_quantizers(32)


def _compare_float_format(got: torch.Tensor, ref: torch.Tensor, rel_step: float) -> tuple[float, bool]:
    """(share of elements that differ, whether every difference is within one rounding step).

    A float format's quantizer may legitimately differ between devices only where a value sits on a
    rounding tie; the two results are then neighbouring grid points, at most `rel_step` of the larger
    magnitude apart (2**-3 for e4m3's 3 mantissa bits; 1.0 for E2M1, whose first step is 0 -> 0.5)."""
    got, ref = got.double(), ref.double()
    diff = got != ref
    bound = rel_step * torch.maximum(got.abs(), ref.abs())
    return float(diff.double().mean()), bool(((got - ref).abs() <= bound)[diff].all())


@pytest.fixture(scope="session")
def PinnedToCPU():
    return _PinnedToCPU


@pytest.fixture(scope="session")
def check_codes_at_ties():
    return _check_codes_at_ties


@pytest.fixture(scope="session")
def compare_float_format():
    return _compare_float_format


@pytest.fixture(scope="session")
def fake_quantizers():
    return _fake_quantizers


@pytest.fixture(scope="session")
def grid_codes():
    return _grid_codes


@pytest.fixture(scope="session")
def sample():
    return _sample


@pytest.fixture(scope="session")
def within_one_ulp():
    return _within_one_ulp
