"""Where convert quantizes: the plan's device choice (qat/convert/plan.py), decided for a named
machine (device, CUDA capability, whether mslk-cuda imports) without touching a GPU. The GPU run of
these plans is in tests/gpu/test_gpu_runs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qat.convert.plan import ConvertPlan, check_export_dtype, kernel_device
from qat.errors import UserError
from qat.schemes import get_scheme

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
H200, A100, L4, T4 = (9, 0), (8, 0), (8, 9), (7, 5)


@pytest.mark.parametrize("name", ["8da4w", "intx4-weight-only", "intx8-weight-only"])
@pytest.mark.parametrize("machine, cap", [(CPU, None), (CUDA, H200), (CUDA, T4)])
def test_intx_converts_on_the_cpu_on_every_machine(name, machine, cap):
    """intx kernels run on the CPU, where the converted model equals the fake quant bit for bit."""
    assert kernel_device(get_scheme(name), machine, cap, mslk=False) == (CPU, None)


@pytest.mark.parametrize("name, cap", [("int4-weight-only", A100), ("int4-weight-only", H200), ("float8", L4),
                                       ("float8", H200), ("fp8-int4", H200)])
def test_gpu_schemes_convert_on_the_gpu_that_has_their_kernels(name, cap):
    assert kernel_device(get_scheme(name), CUDA, cap, mslk=True) == (CUDA, None)


@pytest.mark.parametrize("name, machine, cap, mslk, why", [
    ("int4-weight-only", CPU, None, True, "scheme 'int4-weight-only' needs a CUDA GPU with sm >= 8.0 (tinygemm, or "
                                          "plain with mslk-cuda); this run is on cpu"),
    ("int4-weight-only", CUDA, T4, True, "scheme 'int4-weight-only' needs a CUDA GPU with sm >= 8.0 (tinygemm, or "
                                         "plain with mslk-cuda) (sm >= 8.0); this GPU is sm 7.5"),
    ("float8", CUDA, A100, False, "scheme 'float8' needs a CUDA GPU with float8 support (Ada, Hopper or newer) "
                                  "(sm >= 8.9); this GPU is sm 8.0"),
    ("fp8-int4", CUDA, L4, True, "scheme 'fp8-int4' needs a CUDA GPU with sm >= 9.0 (Hopper) and the mslk-cuda "
                                 "package (sm >= 9.0); this GPU is sm 8.9"),
    ("fp8-int4", CUDA, H200, False, "scheme 'fp8-int4' needs the mslk-cuda package (pip install mslk-cuda) for its "
                                    "f8i4bf16 kernels: both of torchao's fp8-int4 packings run through it"),
    ("nvfp4", CUDA, H200, True, "scheme 'nvfp4' needs a Blackwell CUDA GPU (sm >= 10.0); this GPU is sm 9.0"),
])
def test_without_the_kernels_the_plan_stays_on_the_cpu_and_says_why(name, machine, cap, mslk, why):
    assert kernel_device(get_scheme(name), machine, cap, mslk) == (CPU, why)


def test_int4_without_mslk_still_has_tinygemm():
    """tile_packed_to_4d is PyTorch's own kernel: no extra package for int4 weight-only."""
    assert kernel_device(get_scheme("int4-weight-only"), CUDA, A100, mslk=False) == (CUDA, None)


def test_int4_packs_bf16_weights_only():
    meta = {"config": {"training": {"dtype": "fp32"}}}
    with pytest.raises(UserError, match=r"packs bf16 weights .* would be fp32 \(--dtype auto\): rerun with --dtype bf16"):
        check_export_dtype(get_scheme("int4-weight-only"), meta, "auto")
    check_export_dtype(get_scheme("int4-weight-only"), meta, "bf16")
    check_export_dtype(get_scheme("int4-weight-only"), {"config": {"training": {"dtype": "bf16"}}}, "auto")
    check_export_dtype(get_scheme("8da4w"), meta, "auto")  # intx and float8 take either dtype
    check_export_dtype(get_scheme("float8"), meta, "fp32")


def test_only_a_real_convert_leaves_the_cpu():
    common = dict(checkpoint=Path("step-000001"), out=Path("out"), scheme=get_scheme("float8"), group_size=None,
                  embedding=None, trained=True, lora=False)
    assert ConvertPlan(**common).device == "cpu"
    assert ConvertPlan(**common, device="cuda:0").device == "cuda:0"
    for mode in ("simulated", "none"):
        with pytest.raises(ValueError, match="only a real-kernel convert leaves the CPU"):
            ConvertPlan(**common, quantize=mode, device="cuda:0")


def test_gguf_export_needs_a_gguf_scheme():
    from qat.convert.plan import check_gguf

    bf16, qat = {"config": {}}, {"config": {}, "qat": {"scheme": "8da4w"}}
    with pytest.raises(UserError, match=r"^--gguf needs a GGUF scheme \(q4_0 or q8_0\), but PTQ would use '8da4w'; "
                                        r"add --scheme q4_0 or --scheme q8_0$"):
        check_gguf(get_scheme("8da4w"), bf16, "f16", only_hf=False)
    with pytest.raises(UserError, match=r"^--gguf needs a GGUF scheme .* this checkpoint was trained with '8da4w'$"):
        check_gguf(get_scheme("8da4w"), qat, "f16", only_hf=False)
    with pytest.raises(UserError, match="cannot go with --only-hf"):
        check_gguf(get_scheme("q4_0"), bf16, "f16", only_hf=True)
    check_gguf(get_scheme("q4_0"), bf16, "f32", only_hf=False)
    check_gguf(get_scheme("8da4w"), bf16, None, only_hf=False)  # no --gguf: nothing to check


def test_gguf_artifact_runs_last():
    plan = ConvertPlan(checkpoint=Path("c"), out=Path("o"), scheme=get_scheme("q4_0"), group_size=None,
                       embedding=None, trained=True, lora=True, quantize="simulated", gguf="f16")
    assert plan.artifacts == ["adapter", "hf", "simulated", "gguf"]
    assert ConvertPlan(**{**plan.__dict__, "gguf": None}).artifacts == ["adapter", "hf", "simulated"]
