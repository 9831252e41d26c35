"""The fake quantizers as custom ops: an opaque op under torch.compile, so a compiled block trains
the grid that eager mode (and convert) computes, and fused Triton kernels on CUDA.

Opaque op. Inductor fuses elementwise work and keeps bf16 intermediates in fp32 (it drops the
round-to-bf16 between fused ops), rewrites a division by a constant as a multiplication by its
reciprocal, and Triton lowers fp32 division to an approximate instruction. Each of these moves a
value that sits near a rounding tie of the quantizer to the neighbouring grid point: on the CPU
backend, 10.8% of the intx4 fake-quantized bf16 weights and 0.33% of their clip decisions differ
from eager (group 32, 256x512), 24% of the float8 values; MXFP4's E8M0 scales do not compile on
the CPU backend at all. Inside the op `qat::fake_quant` the quantizer runs its eager code, which
Inductor calls as one kernel sequence it cannot fuse or reorder: compiled equals eager bit for
bit, forward values and the straight-through mask (tests/unit/test_compile_fq.py). The matmuls
and everything else in the block are still compiled. Eager mode on the CPU does not go through
the op (no dispatch cost): a quantizer's `__call__` takes it only while Dynamo traces.

Fused ops. Every family has Triton kernels that compute the scales, the values and the mask in
one pass and equal the eager code bit for bit: the affine integer quantizers (intx weights, int8
per-token activations) and float8 e4m3 per row in qat/fq_triton.py, the block formats (int4,
float8-then-int4, GGUF, MXFP4, NVFP4) in qat/fq_triton_blocks.py. A quantizer names its kernel in
`fused_args` (a FusedCall). The ops: `qat::fused_fq` (values, and the mask when asked) and
`qat::fused_ste` (a gradient times the mask, recomputed in the same pass). They run where the tensor is on CUDA
(eager and compiled alike, so compiled still equals eager), with fake impls for tracing and an
autograd formula (the clipped straight-through estimator). `QAT_FQ_KERNELS` picks the route:
`auto` (Triton on CUDA when triton is importable, else torch), `torch` (always the eager code),
`triton` (always the kernels: on CPU tensors only under TRITON_INTERPRET=1, which the tests use).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import ClassVar, NamedTuple, Optional

import torch

from qat.errors import UserError

_REGISTRY: dict[str, "OpaqueFakeQuant"] = {}
ROUTES = ("auto", "torch", "triton")
_route = {"name": os.environ.get("QAT_FQ_KERNELS", "auto")}
_HAS_TRITON = importlib.util.find_spec("triton") is not None
BLOCKS_MAX = 1024  # the longest block qat/fq_triton_blocks.py holds in one tile row


class FusedCall(NamedTuple):
    """How a quantizer runs as a Triton kernel. kernel "affine": qat/fq_triton.py's launch with
    args (segment length, qmin, qmax, asymmetric, per-segment scale or None) and kw (float8);
    kernel "blocks": qat/fq_triton_blocks.py's launch with args (format, block length)."""
    kernel: str
    args: tuple
    kw: Optional[dict] = None


class OpaqueFakeQuant:
    """Mixin of the fake quantizers (frozen dataclasses): subclasses define
    `eager(x[, scale], mask=True)` returning (values, mask or None). The dataclass repr names the
    quantizer and its parameters, so it is the key the ops look the quantizer up by. A subclass
    with a Triton kernel defines `fused_args`."""

    has_mask: ClassVar[bool] = True  # False: a pure straight-through format (mask None)

    def __post_init__(self):
        _register(self)

    def __setstate__(self, state):  # unpickled or deep-copied in another process: register there too
        self.__dict__.update(state)
        _register(self)

    def __call__(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None, mask: bool = True):
        """(fake-quantized x, clip mask), the mask None when `mask` is False or the format has none."""
        if fused_route(self, x):
            out, m = torch.ops.qat.fused_fq(x, scale, self._fq_key, mask)
            return out, (m if mask and self.has_mask else None)
        if torch.compiler.is_compiling():
            out, m = torch.ops.qat.fake_quant(x, self._fq_key, scale, mask)
            return out, (m if mask and self.has_mask else None)
        return self.eager(x, mask=mask) if scale is None else self.eager(x, scale, mask=mask)

    def ste(self, grad: torch.Tensor, x: torch.Tensor, scale: Optional[torch.Tensor] = None,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The clipped straight-through gradient: `grad` where x was not clipped, zero where it was,
        in `out_dtype` (grad's by default). Fused: the mask is recomputed inside the same kernel."""
        out_dtype = out_dtype or grad.dtype
        if not self.has_mask:
            return grad.to(out_dtype)
        if fused_route(self, x):
            return torch.ops.qat.fused_ste(grad, x, scale, self._fq_key, out_dtype)
        _, m = self(x, scale)
        return (grad * m).to(out_dtype)

    def fused_args(self, x: torch.Tensor, scale: Optional[torch.Tensor]) -> Optional[FusedCall]:
        """The Triton kernel that quantizes `x` (a learned `scale` already in x's dtype), or None
        where this quantizer or this tensor has no fused path. Cheap: the route asks it per call."""
        return None


def _register(fq: OpaqueFakeQuant) -> None:
    key = repr(fq)
    object.__setattr__(fq, "_fq_key", key)  # frozen dataclass: set past its __setattr__
    _REGISTRY.setdefault(key, fq)


# --- the route ------------------------------------------------------------------------------------

def fused_route(fq: OpaqueFakeQuant, x: torch.Tensor) -> bool:
    """Whether `fq(x)` runs the Triton kernel (see the module docstring for QAT_FQ_KERNELS)."""
    name = _route["name"]
    if name not in ROUTES:
        raise UserError(f"QAT_FQ_KERNELS={name!r} is not one of {', '.join(ROUTES)}; unset it for auto")
    if name == "torch" or not _HAS_TRITON or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if fq.fused_args(x, None) is None:
        return False
    if name == "auto":
        return x.is_cuda
    _check_interpreter(x.device)
    return True


def _check_interpreter(device: torch.device) -> None:
    """QAT_FQ_KERNELS=triton on CPU tensors runs the kernels in Triton's interpreter, or nowhere."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("QAT_FQ_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before triton is "
                        "imported); unset QAT_FQ_KERNELS to quantize with torch ops on the CPU")


def describe_route(quantizers, device: torch.device) -> Optional[str]:
    """One line for a run's log: what computes these fake quantizers on `device` (None: no
    quantizer of ours, e.g. torchao's own under qat.backend=torchao). The decision is
    fused_route's on a [256, 4096] bf16 probe on `device` (every format's whole-block checks pass
    for it), so it refuses, as the first step would, QAT_FQ_KERNELS=triton on the CPU outside the
    interpreter; the rest only names the reason."""
    ours = [fq for fq in quantizers if isinstance(fq, OpaqueFakeQuant)]
    if not ours:
        return None
    probe = torch.empty(256, 4096, dtype=torch.bfloat16, device=device)
    fused = [fq for fq in ours if fused_route(fq, probe)]
    if fused:
        how = "Triton kernels" + ("" if device.type == "cuda" else " in Triton's interpreter (QAT_FQ_KERNELS=triton)")
        if len(fused) < len(ours):
            how += f" for {len(fused)} of its {len(ours)} quantizers, torch ops for the rest"
    elif _route["name"] == "torch":
        how = "torch ops (QAT_FQ_KERNELS=torch)"
    elif not _HAS_TRITON:
        how = "torch ops (triton is not installed)"
    elif all(fq.fused_args(probe, None) is None for fq in ours):
        how = "torch ops (this scheme has no Triton kernel)"
    else:
        how = "torch ops (the Triton kernels run on CUDA tensors)"
    return f"fake quantization runs as {how}"


def set_route(name: str) -> None:
    if name not in ROUTES:
        raise ValueError(f"fake-quantization route {name!r} is not one of {ROUTES}")
    _route["name"] = name


@contextlib.contextmanager
def route(name: str):
    """Run the fake quantizers on the `name` route inside the block (tests, bench/count_kernels.py)."""
    before = _route["name"]
    set_route(name)
    try:
        yield
    finally:
        _route["name"] = before


# --- the opaque op (eager code, under torch.compile) ----------------------------------------------

def _no_mask(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,), dtype=torch.bool)


@torch.library.custom_op("qat::fake_quant", mutates_args=())
def fake_quant_op(x: torch.Tensor, key: str, scale: Optional[torch.Tensor],
                  with_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized x, clip mask or an empty tensor) of the registered quantizer `key`."""
    fq = _REGISTRY[key]
    out, mask = fq.eager(x, mask=with_mask) if scale is None else fq.eager(x, scale, mask=with_mask)
    out = out.contiguous()
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        out = out.clone()  # an op's output may not alias its input
    return out, (mask.contiguous() if mask is not None else _no_mask(x))


@fake_quant_op.register_fake
def _(x, key, scale, with_mask):
    fq = _REGISTRY[key]
    mask = x.new_empty(x.shape, dtype=torch.bool) if fq.has_mask and with_mask else _no_mask(x)
    return x.new_empty(x.shape), mask


# --- the fused ops (Triton) -----------------------------------------------------------------------

def blocks_call(fmt: str, x: torch.Tensor, block: int) -> Optional[FusedCall]:
    """A block format's FusedCall, where x's last dimension is made of whole blocks."""
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % block or block > BLOCKS_MAX:
        return None
    return FusedCall("blocks", (fmt, block))


def _launch(key: str, x: torch.Tensor, scale: Optional[torch.Tensor], mode: int, **kw):
    """Run the quantizer `key`'s kernel over contiguous x in `mode` (see fq_triton.launch)."""
    from qat import fq_triton, fq_triton_blocks

    call = _REGISTRY[key].fused_args(x, scale)
    if call.kernel == "blocks":
        return fq_triton_blocks.launch(x, *call.args, mode, **kw)
    seg_len, qmin, qmax, asym, seg_scale = call.args
    seg_scale = seg_scale.contiguous() if seg_scale is not None else None
    return fq_triton.launch(x, seg_len, qmin, qmax, asym, seg_scale, mode, **(call.kw or {}), **kw)


@torch.library.custom_op("qat::fused_fq", mutates_args=())
def fused_fq(x: torch.Tensor, scale: Optional[torch.Tensor], key: str,
             with_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized x, clip mask or an empty tensor), contiguous: one Triton kernel."""
    from qat import fq_triton

    x = x.contiguous()
    with_mask = with_mask and _REGISTRY[key].has_mask
    out, mask = _launch(key, x, scale, fq_triton.MODE_VALUES_MASK if with_mask else fq_triton.MODE_VALUES)
    return out, (mask if mask is not None else _no_mask(x))


@fused_fq.register_fake
def _(x, scale, key, with_mask):
    with_mask = with_mask and _REGISTRY[key].has_mask
    return x.new_empty(x.shape), (x.new_empty(x.shape, dtype=torch.bool) if with_mask else _no_mask(x))


@torch.library.custom_op("qat::fused_ste", mutates_args=())
def fused_ste(grad: torch.Tensor, x: torch.Tensor, scale: Optional[torch.Tensor], key: str,
              out_dtype: torch.dtype) -> torch.Tensor:
    """grad * (clip mask of x), in `out_dtype`: one Triton kernel that recomputes the mask."""
    from qat import fq_triton

    x, grad = x.contiguous(), grad.contiguous()  # the kernel reads both in one flat layout
    return _launch(key, x, scale, fq_triton.MODE_STE, grad=grad, out_dtype=out_dtype)[0]


@fused_ste.register_fake
def _(grad, x, scale, key, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _fused_fq_setup(ctx, inputs, output):
    x, scale, key, _ = inputs
    ctx.save_for_backward(x, scale)
    ctx.key = key


def _fused_fq_backward(ctx, grad_out, _grad_mask):
    """The clipped straight-through estimator for x; the LSQ gradient for a learned scale."""
    x, scale = ctx.saved_tensors
    fq = _REGISTRY[ctx.key]
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    gx = torch.ops.qat.fused_ste(grad_out, x, scale, ctx.key, x.dtype) if ctx.needs_input_grad[0] else None
    gs = fq.scale_grad(x, scale, grad_out) if scale is not None and ctx.needs_input_grad[1] else None
    return gx, gs, None, None


fused_fq.register_autograd(_fused_fq_backward, setup_context=_fused_fq_setup)
