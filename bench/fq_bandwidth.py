"""Fake quantization at memory speed: each quantizer's kernels against a plain copy of the tensor.

    python bench/fq_bandwidth.py --out $OUT          # on a GPU: writes fq_bandwidth.json there
    python bench/fq_bandwidth.py --smoke             # tiny shapes on the CPU (Triton's interpreter)

For each scheme, the weight quantizer on a [8192, 4096] weight and the activation quantizer on
[16384, 4096] activations, bf16 as training runs: the forward (values only) and the backward's
straight-through pass (the gradient times the recomputed clip mask; formats that never clip have
none), on the Triton route (what CUDA runs) and on the torch route (the eager code, what CUDA ran
before the kernels). Each is timed with CUDA events, median of `--iters`, after a warmup that
also compiles. GB/s counts the least traffic the pass needs: read x and write the output (values),
read x and the gradient and write the output (straight-through). `of copy` is that bandwidth over
`Tensor.copy_`'s on the same tensor (read and write): 1.0 is memory speed.

`--elems` times the Triton route again with other tile sizes (elements a program holds at once,
qat/fq_triton.py's _ELEMS), to choose the layout. Before timing, every pass is checked against the
torch route: the outputs must be equal bit for bit (`equal` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = {"8da4w": 32, "intx4-weight-only": 32, "float8": None, "int4-weight-only": 128, "fp8-int4": 128,
           "nvfp4": None, "mxfp4": None, "q4_0": None, "q8_0": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated scheme names")
    p.add_argument("--elems", default="4096", help="tile sizes to time the Triton route with (first: the default)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", help="write fq_bandwidth.json into this folder")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one iteration, on the CPU (checks the script)")
    return p.parse_args(argv)


def timer(fn, iters: int, cuda: bool) -> float:
    """Median seconds of fn() over `iters` runs, after two warmup runs."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def passes(fq, x, g):
    """{pass name: (function, bytes it must move at least)}."""
    nbytes = x.numel() * x.element_size()
    out = {"values": (lambda: fq(x, mask=False)[0], 2 * nbytes)}
    if fq.has_mask:
        out["ste"] = (lambda: fq.ste(g, x), 3 * nbytes)
    return out


def measure(name: str, role: str, fq, x, elems: list[int], iters: int, cuda: bool) -> list[dict]:
    import torch

    from qat import fq_triton
    from qat.fq_op import route

    g = torch.randn_like(x)
    copy_s = timer(lambda: torch.empty_like(x).copy_(x), iters, cuda)
    copy_gbs = 2 * x.numel() * x.element_size() / copy_s / 1e9
    rows = []
    for pname, (fn, nbytes) in passes(fq, x, g).items():
        with route("torch"):
            ref = fn()
            torch_s = timer(fn, iters, cuda)
        default = fq_triton._ELEMS
        for e in elems:
            fq_triton._ELEMS = e  # read by the launchers' layout at every call
            try:
                with route("triton"):
                    equal = torch.equal(fn().view(torch.int16), ref.view(torch.int16))
                    triton_s = timer(fn, iters, cuda)
            finally:
                fq_triton._ELEMS = default
            gbs = nbytes / triton_s / 1e9
            rows.append({"scheme": name, "tensor": role, "shape": list(x.shape), "pass": pname, "elems": e,
                         "equal": equal, "triton_ms": round(triton_s * 1e3, 4), "torch_ms": round(torch_s * 1e3, 4),
                         "speedup": round(torch_s / triton_s, 2), "gb_s": round(gbs, 1),
                         "copy_gb_s": round(copy_gbs, 1), "of_copy": round(gbs / copy_gbs, 3)})
            print(f"{name:18} {role:10} {pname:7} elems={e:5} {rows[-1]['triton_ms']:9.4f} ms "
                  f"(torch {rows[-1]['torch_ms']:9.4f} ms, x{rows[-1]['speedup']:6.2f})  "
                  f"{rows[-1]['gb_s']:8.1f} GB/s = {rows[-1]['of_copy']:.2f} of copy  equal={equal}", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    sys.path.insert(0, str(ROOT))
    import torch

    from qat.schemes import get_scheme

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("error: no CUDA device; this benchmark times GPU kernels (--smoke checks the script on the CPU)")
        return 2
    dev = "cuda" if cuda else "cpu"
    w_shape, a_shape = ((64, 256), (48, 256)) if args.smoke else ((8192, 4096), (16384, 4096))
    iters = 1 if args.smoke else args.iters
    elems = [int(e) for e in args.elems.split(",")]
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name in args.schemes.split(","):
        wfq, afq = get_scheme(name).fake_quantizers(SCHEMES.get(name, 32))
        for role, fq, shape in (("weight", wfq, w_shape), ("activation", afq, a_shape)):
            if fq is None:
                continue
            x = (torch.randn(shape, generator=gen, device=dev) * 0.05).to(torch.bfloat16)
            rows += measure(name, role, fq, x, elems, iters, cuda)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
        (Path(args.out) / "fq_bandwidth.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
