"""GPU checks (marker `gpu`) through the recipes on the tiny world: training, resume, convert with
real kernels and evaluation, all from one set of trained runs.

The runs are tiny (seq 64, batch 4, 6 steps), so each launch is mostly its imports: every wave of
processes starts at once and shares the GPU (16 CPU cores on the device machine). Concurrency does
not change a run's numbers: each process has its own CUDA context and deterministic kernels
(`CUBLAS_WORKSPACE_CONFIG=:4096:8`), which is what the bitwise resume checks rely on.

    wave 1  training: full and LoRA x bf16 and QAT 8da4w (checkpoints at steps 3 and 6), emulated
            float8/nvfp4/mxfp4 QAT, and QAT with intx4-weight-only, int4-weight-only and fp8-int4
            (full QAT with flex_attention launches alone, from its test)
    wave 2  resumes from step 3, and convert of every QAT run that has a convert path here
    wave 3  evaluate.py --device cuda on two quantized folders (intx on the CPU-built path, int4 tinygemm)

What convert must give (docs/gpu.md): intx schemes convert on the CPU on any machine and equal the
fake-quantized forward bit for bit; int4 converts on the GPU and multiplies with exactly the weights
its fake quantizer trained (read back through the kernel); float8 converts on the GPU, its weights
within one e4m3 rounding of the fake quantizer's; fp8-int4 converts on Hopper with mslk-cuda, and
without it refuses with one line naming the package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS, MID = 6, 3
QAT = ["qat.enabled=true", "qat.scheme=8da4w", "qat.group_size=32"]
FULL = ["optimizer.lr=3e-3"]
LORA = ["lora.enabled=true", "lora.rank=8", "lora.alpha=16", "optimizer.lr=1e-2"]
MODES = {"full_bf16": FULL, "full_qat": FULL + QAT, "lora_bf16": LORA, "lora_qat": LORA + QAT}
FLOAT_SCHEMES = ["float8", "nvfp4", "mxfp4"]
# QAT runs converted below: run name -> (scheme, group size)
CONVERTED = {"full_qat": ("8da4w", 32), "intx4": ("intx4-weight-only", 32), "int4": ("int4-weight-only", 128),
             "float8": ("float8", None), "fp8_int4": ("fp8-int4", 128)}


def capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def has_mslk() -> bool:
    import importlib.util

    return importlib.util.find_spec("mslk") is not None


def scheme_args(scheme: str, group) -> list[str]:
    return ["qat.enabled=true", f"qat.scheme={scheme}"] + ([f"qat.group_size={group}"] if group else [])


def training_runs() -> dict[str, list[str]]:
    """Every run of wave 1: its overrides after the shared GPU ones."""
    runs = {mode: extra + [f"checkpoint.every_n_steps={MID}"] for mode, extra in MODES.items()}
    runs.update({s: FULL + scheme_args(s, None) for s in FLOAT_SCHEMES})
    runs.update({name: FULL + scheme_args(scheme, group) for name, (scheme, group) in CONVERTED.items()
                 if name not in runs})
    return runs


def gpu_env(env) -> dict:
    # cuBLAS picks reduction orders per workspace; a fixed workspace makes reruns bitwise
    return {**env(), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def launch_all(cmds: dict[str, list], env: dict) -> dict[str, subprocess.CompletedProcess]:
    """Start every command at once, wait for all; output goes to files (a full pipe would stall a child)."""
    procs = {}
    for name, cmd in cmds.items():
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        procs[name] = (subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=out, stderr=err, text=True),
                       out, err, cmd)
    done = {}
    for name, (proc, out, err, cmd) in procs.items():
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        out.seek(0), err.seek(0)
        done[name] = subprocess.CompletedProcess(cmd, rc, out.read(), err.read())
        out.close(), err.close()
    return done


def ok(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def recipe(script: str, *args) -> list:
    return [sys.executable, ROOT / "recipes" / script, *args]


def train_command(world: Path, out: Path, extra: list[str], *, base_overrides, train_cmd) -> list:
    """The CPU suite's tiny run, moved to one GPU in bf16 (fp32 master weights, NCCL world of one)."""
    drop = ("training.dtype=", "fsdp.device=", "training.steps=")
    shared = [o for o in base_overrides(world, out) if not o.startswith(drop)]
    return train_cmd(shared + ["training.dtype=bf16", "fsdp.device=cuda", f"training.steps={STEPS}"] + extra)


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory, base_overrides, train_cmd, env) -> dict:
    """Wave 1: every training run at once. name -> (run folder, finished process)."""
    root = tmp_path_factory.mktemp("gpu_runs")
    cmds = {name: train_command(world, root / name, extra, base_overrides=base_overrides, train_cmd=train_cmd)
            for name, extra in training_runs().items()}
    results = launch_all(cmds, gpu_env(env))
    return {name: (root / name, results[name]) for name in cmds}


def trained(runs, name: str) -> Path:
    path, proc = runs[name]
    ok(proc, f"training run {name}")
    return path


@pytest.fixture(scope="module")
def wave2(runs, world, tmp_path_factory, base_overrides, train_cmd, env) -> dict:
    """Wave 2 at once: each mode resumed from its step-3 checkpoint in a fresh run folder, and
    convert of every QAT run in CONVERTED. A failed training run is reported by its own tests."""
    root = tmp_path_factory.mktemp("gpu_resumed")
    cmds, resumed = {}, {}
    step = f"step-{MID:06d}"
    for mode in MODES:
        path, proc = runs[mode]
        if proc.returncode == 0:
            resumed[mode] = root / mode
            shutil.copytree(path / "checkpoints" / step, resumed[mode] / "checkpoints" / step)
            cmds[f"resume:{mode}"] = train_command(world, resumed[mode], training_runs()[mode] + ["checkpoint.resume=auto"],
                                                   base_overrides=base_overrides, train_cmd=train_cmd)
    for name in CONVERTED:
        path, proc = runs[name]
        if proc.returncode == 0:
            cmds[f"convert:{name}"] = recipe("convert.py", "--checkpoint", path)
    return {"resumed": resumed, "procs": launch_all(cmds, gpu_env(env))}


def converted(runs, wave2, name: str) -> tuple[Path, dict]:
    """(export folder, verify.json) of a QAT run's convert."""
    run = trained(runs, name)
    ok(wave2["procs"][f"convert:{name}"], f"convert of {name}")
    out = run / "export" / f"step-{STEPS:06d}"
    return out, json.loads((out / "verify.json").read_text())


@pytest.fixture(scope="module")
def evaluated(runs, wave2, world, tmp_path_factory, env) -> dict:
    """Wave 3: evaluate.py on the GPU with two quantized folders (intx from the CPU path, int4 from the GPU path)."""
    root = tmp_path_factory.mktemp("gpu_eval")
    cmds = {}
    for name in ("full_qat", "int4"):
        folder = runs[name][0] / "export" / f"step-{STEPS:06d}" / "quantized"
        if folder.is_dir():
            cmds[name] = recipe("evaluate.py", "--model", folder, "--tasks", "local", "--data-dir", world / "eval",
                                "--limit", "16", "--device", "cuda", "--out", root / f"{name}.json")
    return {name: (root / f"{name}.json", proc) for name, proc in launch_all(cmds, gpu_env(env)).items()}


# --- training ----------------------------------------------------------------------------------
# Calibrated on the CPU (fp32, same data, 6 steps, 2 of them warm-up): see docs/gpu.md for the numbers.

def early_and_late(ls: list[float]) -> tuple[float, float]:
    return ls[0], sum(ls[-3:]) / 3


@pytest.mark.parametrize("mode", list(MODES))
def test_one_gpu_bf16_training_decreases_the_loss(runs, mode, losses):
    ls = losses(trained(runs, mode))
    assert len(ls) == STEPS and all(l == l for l in ls), ls  # no NaN
    first, last = early_and_late(ls)
    assert last < 0.97 * first, ls


@pytest.mark.parametrize("mode", list(MODES))
def test_one_gpu_resume_is_bitwise(runs, wave2, mode, load_checkpoint_tensors, losses):
    """Resume from the step-3 checkpoint in a fresh process: the same losses and weights, bit for bit."""
    straight = trained(runs, mode)
    ok(wave2["procs"][f"resume:{mode}"], f"resume of {mode}")
    resumed = wave2["resumed"][mode]
    assert losses(resumed) == losses(straight)[MID:]
    step = f"step-{STEPS:06d}"
    ref = load_checkpoint_tensors(straight / "checkpoints" / step)["model"]
    got = load_checkpoint_tensors(resumed / "checkpoints" / step)["model"]
    assert ref.keys() == got.keys()
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []


@pytest.mark.parametrize("scheme", FLOAT_SCHEMES)
def test_float_format_qat_trains_like_bf16(runs, scheme, losses):
    """Emulated QAT runs on any GPU (NVFP4 through torchao's own kernels fails on Hopper)."""
    ref, ls = losses(trained(runs, "full_bf16")), losses(trained(runs, scheme))
    assert len(ls) == STEPS and all(l == l for l in ls), ls
    (f0, f1), (r0, r1) = early_and_late(ls), early_and_late(ref)
    assert abs(f0 - r0) <= 0.05 * r0, (ls, ref)  # same data and init: close at step 1
    assert f0 - f1 >= 0.7 * (r0 - r1), (ls, ref)  # and learns about as much


def test_packed_documents_train_the_same_with_flex_attention(world, tmp_path, base_overrides, train_cmd, env, losses):
    """The same QAT run with flex_attention and with sdpa (both keep packed documents apart; the
    forward's equality is checked on the CPU, tests/unit/test_data.py): step 1 differs only by bf16
    attention rounding (bf16 keeps 8 bits: 2^-8 = 0.4% per value; bound 1%, not yet measured).
    Both launch from here, not in wave 1: flex compiles its kernels on first use, and
    bench/gpu_check.sh gives this test a step of its own."""
    extra = MODES["full_qat"] + ["data.packing=documents"]
    cmds = {impl: train_command(world, tmp_path / impl, extra + [f"model.attn_implementation={impl}"],
                                base_overrides=base_overrides, train_cmd=train_cmd)
            for impl in ("flex_attention", "sdpa")}
    for impl, proc in launch_all(cmds, gpu_env(env)).items():
        ok(proc, f"training with {impl}")
    ref, ls = losses(tmp_path / "sdpa"), losses(tmp_path / "flex_attention")
    assert len(ls) == STEPS and abs(ls[0] - ref[0]) <= 0.01 * ref[0], (ls, ref)
    assert early_and_late(ls)[1] < 0.97 * ls[0], ls


# --- convert -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["full_qat", "intx4"])
def test_intx_convert_on_the_gpu_machine_equals_fake_quant_bitwise(runs, wave2, name):
    """A checkpoint trained on the GPU converts on the CPU (intx kernels run there; the plan keeps the
    CPU path on every machine), and the converted logits equal the fake-quantized forward exactly."""
    _, report = converted(runs, wave2, name)
    assert report["device"] == "cpu" and report["mode"] == "qat" and not report.get("simulated"), report
    assert report["converted_equals_fake_quant"] is True, report
    assert report["reload_equal"] is True


def quantized_linears(folder: Path) -> dict[str, torch.nn.Module]:
    """The decoder Linears of a quantized/ folder, loaded onto the GPU as evaluation loads it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """hf/'s tensors: the merged weights in the export dtype, the input of quantization."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f, device="cuda"))
    return out


def kernel_weights(linear: torch.nn.Module) -> torch.Tensor:
    """The bf16 weights a converted Linear multiplies with, read back through its own kernel: row i
    of I @ W.T is column i of W.T, one product per output summed with exact zeros, so the kernel's
    fp32 accumulation and bf16 output return each dequantized weight exactly."""
    eye = torch.eye(linear.in_features, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        return linear(eye).t().contiguous()


@pytest.mark.skipif(capability() < (8, 0), reason="torchao's int4 kernels need sm >= 8.0")
def test_int4_converts_on_the_gpu_with_the_trained_grid(runs, wave2):
    """int4-weight-only converts on the GPU with the packing this machine has (tinygemm
    `tile_packed_to_4d`, or `plain` with mslk-cuda; recorded in the checkpoint and in verify.json):
    every Linear multiplies with exactly the weights our fake quantizer gives for that packing."""
    from qat.fake_quant import Int4Asymmetric

    out, report = converted(runs, wave2, "int4")
    assert report["device"].startswith("cuda") and report["mode"] == "qat" and not report.get("simulated"), report
    assert report["reload_equal"] is True
    packing = report["scheme"]["int4_packing"]
    assert packing == ("plain" if has_mslk() else "tile_packed_to_4d")
    hf, linears = hf_weights(out / "hf"), quantized_linears(out / "quantized")
    assert len(linears) == 14  # 2 blocks x 7 Linears
    for name, lin in linears.items():
        assert ("TilePacked" if packing == "tile_packed_to_4d" else "Int4Tensor") in type(lin.weight).__name__, name
        wq, _ = Int4Asymmetric(128, packing)(hf[f"{name}.weight"])
        assert torch.equal(kernel_weights(lin), wq), name
    # the same weights, multiplied in another order by another kernel (bf16 outputs through 2 blocks)
    assert report["converted_vs_fake_quant"]["rel_error"] < 5e-2, report
    assert report["converted_vs_fake_quant"]["top1_agreement"] > 0.9, report


@pytest.mark.skipif(capability() < (8, 9), reason="torchao's float8 kernels need sm >= 8.9")
def test_float8_converts_on_the_gpu_within_the_format_rounding(runs, wave2, compare_float_format):
    """float8 converts on the GPU (real kernels, not simulated): each stored weight dequantizes to
    the fake quantizer's value or one e4m3 rounding step from it (a scale one ulp apart moves a
    value at a rounding midpoint), and the logits are those of the fake-quantized forward up to the
    bf16 roundings of the scaled matmuls."""
    from qat.fake_quant import Float8Rowwise

    out, report = converted(runs, wave2, "float8")
    assert report["device"].startswith("cuda") and report["mode"] == "qat" and not report.get("simulated"), report
    assert report["reload_equal"] is True
    hf, linears = hf_weights(out / "hf"), quantized_linears(out / "quantized")
    assert len(linears) == 14
    for name, lin in linears.items():
        assert "Float8" in type(lin.weight).__name__, name
        fake, _ = Float8Rowwise()(hf[f"{name}.weight"])
        # the same primitives on the same device give equal scales; should a scale come out one fp32
        # ulp apart, the bf16 dequantized value moves where it sits near a bf16 midpoint (about 2**-8
        # of a row), and an e4m3 code moves by one step at its own midpoints
        share, one_step = compare_float_format(lin.weight.dequantize().to(fake.dtype).cpu(), fake.cpu(), 2.0 ** -3)
        assert share <= 1e-2 and one_step, (name, share)
    assert report["converted_vs_fake_quant"]["rel_error"] < 5e-2, report
    assert report["converted_vs_fake_quant"]["top1_agreement"] > 0.9, report


@pytest.mark.skipif(capability() < (9, 0), reason="fp8-int4's kernels need sm >= 9.0")
def test_fp8_int4_converts_with_mslk_or_refuses_naming_it(runs, wave2):
    """Both of torchao's fp8-int4 packings run through mslk-cuda: with it, a real convert on the GPU;
    without it, exit status 2, one line naming the package, and no export folder."""
    run = trained(runs, "fp8_int4")
    proc = wave2["procs"]["convert:fp8_int4"]
    if not has_mslk():
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and "needs the mslk-cuda package" in errors[0] and "--simulate" in errors[0], errors
        assert not (run / "export").exists()
        return
    _, report = converted(runs, wave2, "fp8_int4")
    assert report["device"].startswith("cuda") and not report.get("simulated"), report
    assert report["reload_equal"] is True
    assert report["converted_vs_fake_quant"]["rel_error"] < 5e-2, report


# --- evaluate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["full_qat", "int4"])
def test_evaluate_runs_on_the_gpu_with_the_quantized_folder(runs, wave2, evaluated, name):
    converted(runs, wave2, name)
    path, proc = evaluated[name]
    ok(proc, f"evaluate of {name}")
    res = json.loads(path.read_text())["results"]
    assert 0.0 <= res["hellaswag"]["acc"] <= 1.0
    assert res["wikitext"]["bits_per_byte"] > 0
