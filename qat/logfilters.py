"""Silence the start-up messages of our dependencies that are harmless here, and only those.

Both come through `logging` (not `warnings`, not print), while `import torchao` runs:

- torchao/__init__.py tries `torch.ops.load_library` on each `torchao/_C*.so` and logs
  "Failed to load <path>: <reason>" on the "torchao" logger for each failure. In torchao 0.18
  the wheel ships two CUDA kernel libraries, `_C_mxfp8` (MX fp8 casts) and `_C_cutlass_90a`
  (sm90a CUTLASS kernels). On a machine without CUDA they cannot load and nothing of ours needs
  them, so those two lines are dropped there; on a CUDA machine they still show.
- torchao registers its config Enums as pytree constants; torch 2.13 logs "<enum ...> is an Enum
  subclass and is now natively supported by torch.compile ..." on "torch.utils._pytree" for
  each. Dropped when the Enum is torchao's; the same warning about anyone else's Enum shows.

Any other record of these loggers, and every other warning, passes. `install()` must run before
torchao is imported; `import qat` does it.
"""

from __future__ import annotations

import logging
import re
import sys

CUDA_KERNEL_LIBS = re.compile(r"^Failed to load \S*torchao[/\\]_C_(mxfp8|cutlass_\w+)[.\w-]*\.so\b")
ENUM_NOTICE = "%s is an Enum subclass and is now natively supported by torch.compile"


def _cuda_available() -> bool:
    torch = sys.modules.get("torch")  # imported by then: torchao imports it first
    return torch is not None and torch.cuda.is_available()


class TorchaoKernelLibs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (CUDA_KERNEL_LIBS.match(record.getMessage()) and not _cuda_available())


class TorchaoEnumRegistrations(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(ENUM_NOTICE) and record.args):
            return True
        cls = record.args[0] if isinstance(record.args, tuple) else None
        return not getattr(cls, "__module__", "").startswith("torchao")


def install() -> None:
    """Idempotent: a filter is added once per logger."""
    for name, filt in (("torchao", TorchaoKernelLibs), ("torch.utils._pytree", TorchaoEnumRegistrations)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, filt) for f in logger.filters):
            logger.addFilter(filt())
