"""The fake quantizers as one opaque op under torch.compile, so a compiled block trains the grid
that eager mode (and convert) computes.

Inductor fuses elementwise work and keeps bf16 intermediates in fp32 (it drops the round-to-bf16
between fused ops), rewrites a division by a constant as a multiplication by its reciprocal, and
Triton lowers fp32 division to an approximate instruction. Each of these moves a value that sits
near a rounding tie of the quantizer to the neighbouring grid point: on the CPU backend, 10.8% of
the intx4 fake-quantized bf16 weights and 0.33% of their clip decisions differ from eager (group
32, 256x512), 24% of the float8 values; MXFP4's E8M0 scales do not compile on the CPU backend at
all. Inside the op `qat::fake_quant` the quantizer runs its eager code, which Inductor calls as
one kernel sequence it cannot fuse or reorder: compiled equals eager bit for bit, forward values
and the straight-through mask (tests/unit/test_compile_fq.py). The matmuls and everything else in the
block are still compiled.

Eager mode does not go through the op (no dispatch cost): a quantizer's `__call__` takes the op
only while Dynamo traces.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

_REGISTRY: dict[str, "OpaqueFakeQuant"] = {}


class OpaqueFakeQuant:
    """Mixin of the fake quantizers (frozen dataclasses): subclasses define `eager(x[, scale])`
    returning (values, mask or None). The dataclass repr names the quantizer and its parameters,
    so it is the key the op looks the quantizer up by."""

    has_mask: ClassVar[bool] = True  # False: a pure straight-through format (mask None)

    def __post_init__(self):
        _register(self)

    def __setstate__(self, state):  # unpickled or deep-copied in another process: register there too
        self.__dict__.update(state)
        _register(self)

    def __call__(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None):
        if torch.compiler.is_compiling():
            out, mask = torch.ops.qat.fake_quant(x, self._fq_key, scale)
            return out, (mask if self.has_mask else None)
        return self.eager(x) if scale is None else self.eager(x, scale)


def _register(fq: OpaqueFakeQuant) -> None:
    key = repr(fq)
    object.__setattr__(fq, "_fq_key", key)  # frozen dataclass: set past its __setattr__
    _REGISTRY.setdefault(key, fq)


def _no_mask(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,), dtype=torch.bool)


@torch.library.custom_op("qat::fake_quant", mutates_args=())
def fake_quant_op(x: torch.Tensor, key: str, scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized x, clip mask or an empty tensor) of the registered quantizer `key`."""
    fq = _REGISTRY[key]
    out, mask = fq.eager(x) if scale is None else fq.eager(x, scale)
    out = out.contiguous()
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        out = out.clone()  # an op's output may not alias its input
    return out, (mask.contiguous() if mask is not None else _no_mask(x))


@fake_quant_op.register_fake
def _(x, key, scale):
    fq = _REGISTRY[key]
    mask = x.new_empty(x.shape, dtype=torch.bool) if fq.has_mask else _no_mask(x)
    return x.new_empty(x.shape), mask
