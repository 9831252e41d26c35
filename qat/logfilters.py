"""Silence the start-up messages of our dependencies that are harmless here, and only those.

Both come through `logging` (not `warnings`, not print), while `import torchao` runs:

- torchao/__init__.py tries `torch.ops.load_library` on each `torchao/_C*.so` and logs
  "Failed to load <path>: <reason>" on the "torchao" logger for each failure. In torchao 0.18
  the wheel ships two CUDA kernel libraries, `_C_mxfp8` (MX fp8 casts) and `_C_cutlass_90a`
  (sm90a CUTLASS kernels). On a machine without CUDA they cannot load and nothing of ours needs
  them, so those two lines are dropped there; on a CUDA machine they still show.
- torchao/kernel/intmm.py logs "Warning: Detected no triton ..." on "torchao.kernel.intmm"
  when triton is missing, as it is on CPU-only installs. It has a NullHandler, so it shows only
  where logging is configured (pytest, lm-eval); dropped on CPU-only hosts.
- torchao registers its config Enums as pytree constants; torch 2.13 logs "<enum ...> is an Enum
  subclass and is now natively supported by torch.compile ..." on "torch.utils._pytree" for
  each. Dropped when the Enum is torchao's; the same warning about anyone else's Enum shows.

And one of datasets': when a JSON file does not parse, datasets' json builder logs "Failed to load
JSON from file '<file>' with error <type>: <reason>" at ERROR level, then raises an exception with
the same reason. Our entry points turn that exception into the one `error:` line (file, row and
line: qat/data/sources.py), so the logged copy is dropped; the exception still carries it.

Any other record of these loggers, and every other warning, passes. `install()` must run before
torchao is imported; `import qat` does it.
"""

from __future__ import annotations

import logging
import re
import sys

# {logger: message pattern} of what torchao says at import when there is no CUDA
CPU_ONLY_NOISE = {
    "torchao": re.compile(r"^Failed to load \S*torchao[/\\]_C_(mxfp8|cutlass_\w+)[.\w-]*\.so\b"),
    "torchao.kernel.intmm": re.compile(r"^Warning: Detected no triton\b"),
}
ENUM_NOTICE = "%s is an Enum subclass and is now natively supported by torch.compile"


def _cuda_available() -> bool:
    torch = sys.modules.get("torch")  # imported by then: torchao imports it first
    return torch is not None and torch.cuda.is_available()


class TorchaoCpuOnlyNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        noise = CPU_ONLY_NOISE.get(record.name)
        return not (noise is not None and noise.match(record.getMessage()) and not _cuda_available())


class TorchaoEnumRegistrations(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(ENUM_NOTICE) and record.args):
            return True
        cls = record.args[0] if isinstance(record.args, tuple) else None
        return not getattr(cls, "__module__", "").startswith("torchao")


class DatasetsJsonParseCopy(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Failed to load JSON from file"))


def install() -> None:
    """Idempotent: a filter is added once per logger."""
    pairs = [(name, TorchaoCpuOnlyNoise) for name in CPU_ONLY_NOISE]
    pairs += [("torch.utils._pytree", TorchaoEnumRegistrations),
              ("datasets.packaged_modules.json.json", DatasetsJsonParseCopy)]
    for name, filt in pairs:
        logger = logging.getLogger(name)
        if not any(isinstance(f, filt) for f in logger.filters):
            logger.addFilter(filt())
