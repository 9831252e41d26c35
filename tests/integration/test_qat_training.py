"""QAT through the real entry points: the float schemes train on a CPU, learned scales with merged LoRA export exactly what they trained, and their bad input is one line."""

import copy
import json
from pathlib import Path
import pytest
import torch
from qat.fake_quant import QATLinear
from qat.schemes import get_scheme

ROOT = Path(__file__).resolve().parents[2]


def test_merged_lora_mode_with_learned_scales_exports_exactly_what_it_trained(world, tmp_path, base_overrides, run_train, convert_cli, load_checkpoint_tensors):
    """Train QAT+LoRA with fake quantization of W + s*B@A and learned scales at world size 2, convert,
    and check that the quantized model's logits equal the training-time forward bit for bit: convert
    used the trained scales, which moved away from the rule they started from."""
    from qat.fake_quant import IntxWeight

    args = ["lora.enabled=true", "lora.rank=8", "qat.enabled=true", "qat.scheme=8da2w", "qat.group_size=32",
            "qat.lora_merged=true", "qat.learn_scales=true", "qat.scale_lr_multiplier=3", "training.steps=4"]
    run_train(base_overrides(world, tmp_path) + args, 2)


    convert_cli(["--checkpoint", tmp_path])
    report = json.loads((tmp_path / "export/step-000004/verify.json").read_text())
    assert report["converted_equals_training_forward"] is True
    assert report["converted_vs_training_forward"]["max_abs_diff"] == 0.0
    saved = load_checkpoint_tensors(tmp_path / "checkpoints/step-000004")["model"]
    scales = {k: v for k, v in saved.items() if k.endswith("weight_scale")}
    assert len(scales) == 2 * 7  # every decoder Linear of both blocks: a frozen base layer's scale trains
    from safetensors.torch import load_file

    base = load_file(world / "model" / "model.safetensors")
    key = next(k for k in scales if "layers.0.self_attn.q_proj" in k)
    start = IntxWeight(2, 32).init_scale(base["model.layers.0.self_attn.q_proj.weight"])
    assert scales[key].shape == start.shape == (128, 4) and not torch.equal(scales[key], start)
    # Adam moves a parameter by about its learning rate per step, at most: 4 steps at 1e-3 x 3 (the
    # scale multiplier) bound the travel by 1.2e-2; measured 9.1e-3, against scales up to 5.6e-2
    assert float((scales[key] - start).abs().max()) <= 4 * 1e-3 * 3


@pytest.mark.parametrize("scheme", ["float8", "nvfp4", "mxfp4"])
def test_float_schemes_train_on_cpu(world, tmp_path, scheme, base_overrides, run_train, losses):
    run_train(base_overrides(world, tmp_path) + ["qat.enabled=true", f"qat.scheme={scheme}", "training.steps=4"], 1)

    ls = losses(tmp_path)
    assert len(ls) == 4 and ls[-1] < ls[0]


@pytest.mark.parametrize("overrides, needle", [
    (["qat.scheme=float8"], "qat.learn_scales=true is for the intx schemes"),
    (["qat.backend=torchao"], "qat.learn_scales=true needs qat.backend=qatlinear"),
])
def test_learned_scales_bad_input_is_one_line(world, tmp_path, capsys, overrides, needle, base_overrides, recipe):
    import sys


    with pytest.raises(SystemExit) as e:
        recipe("train").main(["--config", str(ROOT / "configs/tiny/full.yaml"), *base_overrides(world, tmp_path),
                           "qat.enabled=true", "qat.learn_scales=true", *overrides])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("scheme, extra, nproc", [
    ("8da4w", ["qat.group_size=32"], 2),
    ("int4-weight-only", ["qat.group_size=32", "lora.enabled=true", "lora.rank=8"], 1),
], ids=["8da4w-full-world2", "int4-lora"])
def test_the_cuda_route_trains_what_the_cpu_reference_trains(world, tmp_path, scheme, extra, nproc, base_overrides,
                                                            train_cmd, env, read_metrics):
    """The recipe with the fake quantizers on the route CUDA runs (the Triton kernels, here in
    Triton's interpreter: QAT_FQ_KERNELS=triton) against the torch route the CPU runs: bf16, FSDP2
    over 2 ranks, the shared-input cache, LoRA's frozen weights quantized once (every format's kernel
    against its reference: tests/unit/test_fq_triton*.py). Per-step losses and
    gradient norms are equal bit for bit, and the log names the route."""
    import subprocess

    runs = {}
    for name, extra_env in (("torch", {}), ("triton", {"QAT_FQ_KERNELS": "triton", "TRITON_INTERPRET": "1"})):
        out = tmp_path / name
        args = base_overrides(world, out) + ["training.dtype=bf16", "training.steps=3", "checkpoint.save_final=false",
                                             "qat.enabled=true", f"qat.scheme={scheme}", *extra]
        proc = subprocess.run(train_cmd(args, nproc), cwd=ROOT, env={**env(), **extra_env}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = [(m["train/loss"], m["train/grad_norm"]) for m in read_metrics(out)], proc.stdout
    assert len(runs["torch"][0]) == 3 and runs["triton"][0] == runs["torch"][0]
    assert "fake quantization runs as Triton kernels in Triton's interpreter" in runs["triton"][1]
    assert "fake quantization runs as torch ops (the Triton kernels run on CUDA tensors)" in runs["torch"][1]
