"""Small units: scheme families, the LR schedule, FLOPs and MFU, the `qat` command."""

from pathlib import Path
import re
import subprocess
import sys

import pytest
import torch

from qat.errors import UserError
from qat.schemes import (SCHEMES, EmbeddingQuant, FP4Scheme, Float8Scheme, Int4Scheme, IntxScheme, Scheme,
                         embedding_from_record, embedding_quant, get_scheme, same_record, scheme_from_record)

ROOT = Path(__file__).resolve().parents[2]


# --- scheme families ------------------------------------------------------------------------

def test_every_scheme_belongs_to_one_family_and_round_trips_through_its_record():
    from qat.gguf_scheme import GGUFScheme

    families = {IntxScheme: "intx", Int4Scheme: "int4", Float8Scheme: "float8", FP4Scheme: "fp4", GGUFScheme: "gguf"}
    for name, s in SCHEMES.items():
        assert families[type(s)] == s.family
        rec = s.record(128, None)
        assert rec["family"] == s.family and scheme_from_record(rec) is s
        assert rec["group_size"] == (128 if s.uses_group_size else None)


def test_only_intx_converts_exactly_and_only_mxfp4_and_gguf_lack_torchao_qat():
    assert {n for n, s in SCHEMES.items() if s.exact_convert} == {n for n in SCHEMES if n.startswith(("8da", "intx"))}
    assert [n for n, s in SCHEMES.items() if not s.torchao_qat] == ["mxfp4", "q4_0", "q8_0"]
    assert [n for n, s in SCHEMES.items() if not s.torchao_kernels] == ["q4_0", "q8_0"]
    assert [n for n, s in SCHEMES.items() if s.gguf_format] == ["q4_0", "q8_0"]


def test_records_that_disagree_with_the_registry_are_refused():
    with pytest.raises(UserError, match="records scheme '8da4w' as family 'float8'"):
        scheme_from_record({"scheme": "8da4w", "family": "float8", "group_size": 32, "embedding": False})
    with pytest.raises(UserError, match="group_size=32 for scheme 'float8', which has no groups"):
        scheme_from_record({"scheme": "float8", "family": "float8", "group_size": 32, "embedding": False})
    # int4-weight-only is torchao's GPU int4 (family int4), never the intx weight-only format
    new = get_scheme("int4-weight-only").record(32, None)
    assert new["family"] == "int4" and scheme_from_record(new) is get_scheme("int4-weight-only")
    assert not same_record(new, get_scheme("intx4-weight-only").record(32, None))
    with pytest.raises(UserError, match="records scheme 'int4-weight-only' as family 'intx'"):
        scheme_from_record({"scheme": "int4-weight-only", "family": "intx", "group_size": 32, "embedding": False})
    with pytest.raises(UserError, match="unknown QAT scheme 'int3-weight-only'. Did you mean 'intx3-weight-only'"):
        get_scheme("int3-weight-only")


def test_int4_group_rules():
    lin = {"a.b": torch.nn.Linear(256, 8)}
    get_scheme("int4-weight-only").check_shapes(lin, 64)
    with pytest.raises(UserError, match=r"needs qat.group_size in \(32, 64, 128, 256\)"):
        get_scheme("int4-weight-only").check_shapes(lin, 16)
    with pytest.raises(UserError, match="groups of 128"):
        get_scheme("fp8-int4").check_shapes(lin, 32)
    assert get_scheme("int4-weight-only").missing_kernels(torch.device("cpu")).startswith(
        "scheme 'int4-weight-only' needs a CUDA GPU")


def test_unknown_combinations_raise_instead_of_falling_through():
    with pytest.raises(ValueError, match="bits=9"):
        IntxScheme("int9-weight-only", bits=9)
    with pytest.raises(ValueError, match="kind='fp6'"):
        FP4Scheme("fp6", kind="fp6")
    bare = Scheme("new-format")  # a family that forgot its numerics fails loudly, never as NVFP4
    with pytest.raises(NotImplementedError):
        bare.base_config(None)
    with pytest.raises(NotImplementedError):
        bare.fake_quantizers(None)
    with pytest.raises(UserError, match="qat.embedding_bits=9 is outside 2..8"):
        EmbeddingQuant(9, 32)


def test_embedding_quantization_has_its_own_bits():
    emb = EmbeddingQuant(8, 64)
    rec = get_scheme("8da2w").record(32, emb)
    assert (rec["embedding"], rec["embedding_bits"], rec["embedding_group_size"]) == (True, 8, 64)
    assert embedding_from_record(rec, get_scheme("8da2w")) == emb
    assert embedding_quant(True, None, 32, get_scheme("fp8-int4")) == EmbeddingQuant(8, 32)
    assert embedding_quant(False, 8, 32, get_scheme("8da4w")) is None


@pytest.mark.parametrize("name, needle", [("8da4w", "group_size=32 does not divide in_features=48 of layer a.b"),
                                          ("nvfp4", "needs in_features divisible by 16: layer a.b has 24"),
                                          ("mxfp4", "needs in_features divisible by 32: layer a.b has 48")])
def test_shape_checks_name_the_layer(name, needle):
    width = 24 if name == "nvfp4" else 48
    with pytest.raises(UserError, match=re.escape(needle)):
        get_scheme(name).check_shapes({"a.b": torch.nn.Linear(width, 8)}, 32)
    get_scheme("float8").check_shapes({"a.b": torch.nn.Linear(width, 8)}, 32)  # rowwise: any width


def test_no_code_outside_the_scheme_module_branches_on_family_names():
    """Each family's behaviour lives in its class; a comparison elsewhere is how the old code let an
    unknown family fall through to FP4 numerics."""
    offenders = []
    for folder in ("qat", "recipes", "eval", "slurm", "bench"):
        for f in (ROOT / folder).rglob("*.py"):
            if f.name in ("schemes.py", "scheme_base.py", "gguf_scheme.py"):  # the scheme modules
                continue
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if re.search(r"\.family\b|['\"](intx|float8|fp4|nvfp4|mxfp4)['\"]\s*(==|!=|in\b)|"
                             r"(==|!=)\s*['\"](intx|float8|fp4|nvfp4|mxfp4)['\"]", line):
                    offenders.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


# --- LR schedule ----------------------------------------------------------------------------

def test_lr_schedule_warmup_then_each_decay():
    from qat.config import SchedulerConfig
    from qat.optim import lr_factor

    warm = SchedulerConfig(warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, 14, warm) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 14, warm) == pytest.approx(1.0)  # decay starts at the peak
    assert lr_factor(9, 14, warm) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2)
    assert lr_factor(14, 14, warm) == pytest.approx(0.1)  # ends at min_lr_ratio
    assert lr_factor(99, 14, warm) == pytest.approx(0.1)  # and stays there
    lin = SchedulerConfig(warmup_steps=0, decay="linear")
    assert [lr_factor(s, 4, lin) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = SchedulerConfig(warmup_steps=2, decay="constant")
    assert [lr_factor(s, 10, const) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_scheduler_drives_the_optimizer_and_resumes_from_its_state():
    from qat.config import OptimizerConfig, SchedulerConfig
    from qat.optim import build_optimizer, build_scheduler

    def fresh():
        p = [torch.nn.Parameter(torch.zeros(2))]
        opt = build_optimizer(p, OptimizerConfig(lr=1e-3))
        return opt, build_scheduler(opt, SchedulerConfig(warmup_steps=2, decay="linear"), 6)

    def run(opt, sched, n):
        lrs = []
        for _ in range(n):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return lrs

    # warmup reaches the peak at step 1; the linear decay starts from the peak at step 2
    assert run(*fresh(), 6) == pytest.approx([5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    opt, sched = fresh()
    first = run(opt, sched, 3)
    opt2, sched2 = fresh()
    sched2.load_state_dict(sched.state_dict())  # what a checkpoint's meta.json carries
    assert first + run(opt2, sched2, 3) == pytest.approx([5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


# --- FLOPs and MFU --------------------------------------------------------------------------

def test_flops_per_token_and_mfu_by_hand():
    from qat.perf import device_peak_flops, flops_per_token, mfu

    # Llama-3.2-1B-like: 1.2358e9 matmul parameters, 16 layers, hidden 2048, seq 2048
    n, attn = 1.2358e9, 12 * 16 * 2048 * 2048
    assert flops_per_token(int(n), 16, 2048, 2048, lora=False) == pytest.approx(6 * n + attn)
    assert flops_per_token(int(n), 16, 2048, 2048, lora=True) == pytest.approx(4 * n + attn)  # no weight grads
    # 50,000 tok/s at 8.22e9 FLOPs/token on one 989 TFLOP/s device is 41.6% MFU; on 8 devices 5.2%
    assert mfu(50_000, 8.22e9, 989e12, 1) == pytest.approx(0.4156, abs=1e-4)
    assert mfu(50_000, 8.22e9, 989e12, 8) == pytest.approx(0.4156 / 8, abs=1e-5)
    assert device_peak_flops(torch.device("cpu")) is None  # no MFU where the peak is unknown


# --- the qat command ------------------------------------------------------------------------


