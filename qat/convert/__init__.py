"""Convert a training checkpoint into deployable artifacts: the library behind recipes/convert.py.

    plan = make_plan("runs/qat")        # newest checkpoint, its own scheme, this machine's kernels
    report = run_convert(plan)          # one process, or a slice per rank under torchrun

  plan.py        ConvertPlan: what to write, the dtype, which checks; every refusal happens here
  pipeline.py    the steps, the same for one process and for slices
  exporters.py   one class per artifact (adapter/, hf/, quantized/, simulated.json)
  io.py          ConvertIO, the interface to where the model lives; LocalIO (one process)
  sharded.py     ShardedIO and the slicing, for torchrun
  transforms.py  rebuild as trained, merge, unfake, cast, QAT convert, PTQ
"""

from qat.convert.pipeline import run_convert
from qat.convert.plan import ConvertPlan, PTQRequest, make_plan

__all__ = ["ConvertPlan", "PTQRequest", "make_plan", "run_convert"]
