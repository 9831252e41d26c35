"""The comparison: recovery arithmetic, a reduced demo through the real script, kill + resume."""

from pathlib import Path
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qat.eval.report import degradation, markdown, recovered, rows

pytestmark = pytest.mark.slow  # an end-to-end pipeline: `make test-slow` (CI runs it)

ROOT = Path(__file__).resolve().parents[2]


def test_recovery_arithmetic_by_hand():
    # accuracy: bf16 0.60, PTQ 0.50, QAT 0.58 -> PTQ lost 0.10, QAT lost 0.02, recovered 80%
    assert degradation(0.60, 0.50, True) == pytest.approx(0.10)
    assert recovered(0.60, 0.50, 0.58, True) == pytest.approx(0.8)
    # perplexity: bf16 10, PTQ 14, QAT 11 -> +4 vs +1 -> recovered 75%
    assert recovered(10.0, 14.0, 11.0, False) == pytest.approx(0.75)
    # QAT better than the unquantized model: more than 100% recovered
    assert recovered(10.0, 14.0, 9.0, False) == pytest.approx(1.25)
    # PTQ did not hurt, or hurt within two standard errors: no meaningful share
    assert recovered(0.60, 0.61, 0.58, True) is None
    assert recovered(0.60, 0.59, 0.58, True, stderr=0.01) is None
    assert recovered(0.60, 0.57, 0.59, True, stderr=0.01) == pytest.approx(2 / 3)


def test_report_table_rows():
    res = {"bf16": {"hellaswag": {"acc": 0.6, "acc_stderr": 0.01, "acc_norm": 0.6},
                    "wikitext": {"word_perplexity": 10.0, "byte_perplexity": 2.0, "bits_per_byte": 1.0}},
           "ptq": {"hellaswag": {"acc": 0.5, "acc_stderr": 0.01, "acc_norm": 0.55},
                   "wikitext": {"word_perplexity": 14.0, "byte_perplexity": 2.4, "bits_per_byte": 1.26}},
           "qat": {"hellaswag": {"acc": 0.58, "acc_stderr": 0.01, "acc_norm": 0.6},
                   "wikitext": {"word_perplexity": 11.0, "byte_perplexity": 2.1, "bits_per_byte": 1.07}}}
    r = rows(res)
    assert r["recovered by QAT"]["hellaswag acc"] == pytest.approx(0.8)
    assert r["recovered by QAT"]["wikitext bits/byte"] == pytest.approx(0.19 / 0.26)
    assert r["PTQ degradation"]["wikitext word ppl"] == pytest.approx(4.0)
    md = markdown(res, {"title": "t", "scheme": "8da4w"})
    assert "| recovered by QAT | 80% |" in md and "0.6000 ± 0.0100" in md


def demo_tree(world, tmp_path):
    """A scratch checkout: the real configs and recipes, the test world as assets/world."""
    for d in ("configs", "recipes", "qat", "eval"):
        os.symlink(ROOT / d, tmp_path / d)
    (tmp_path / "assets").mkdir()
    os.symlink(world, tmp_path / "assets" / "world")
    return tmp_path


REDUCED = ["train_overrides=[training.steps=30,training.batch_size=8,data.seq_len=64,"
           "logging.wandb.enabled=false]", "eval.limit=60", "wandb.enabled=false", "qad=true",
           "learn_scales=false"]  # the _ls arms differ by one training override: see test_arms


def run_demo(tree, extra=(), pretrain_steps=60, *, env, **popen):
    e = dict(env(), PY=sys.executable, PRETRAIN_OVERRIDES=f"training.steps={pretrain_steps} data.seq_len=64 "
             "logging.wandb.enabled=false logging.progress_bar=false")
    return subprocess.Popen(["bash", str(tree / "recipes/demo.sh"), *REDUCED, *extra], cwd=tree, env=e,
                            start_new_session=True, **popen)


def test_reduced_demo_killed_between_stages_resumes_and_shows_the_effect(world, tmp_path, env):
    """The real demo script at reduced size, killed after the first arm and run again."""
    tree = demo_tree(world, tmp_path)
    cmp = tree / "runs/demo/compare"
    proc = run_demo(tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (cmp / "bf16" / "done.json").exists():
        assert proc.poll() is None and time.time() < deadline, "demo ended before the first arm finished"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole tree: bash, compare, torchrun and workers
    proc.wait()
    bf16_metrics = (cmp / "bf16" / "metrics.jsonl").read_text()
    assert not (cmp / "report.md").exists()
    proc = run_demo(tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert "[compare] train bf16: done already" in out
    assert (cmp / "bf16" / "metrics.jsonl").read_text() == bf16_metrics  # not retrained
    assert json.loads((cmp / "qat" / "done.json").read_text())["step"] == 30
    results = json.loads((cmp / "results.json").read_text())["results"]
    bpb = {k: results[k]["wikitext"]["bits_per_byte"] for k in ("bf16", "ptq", "qat")}
    assert bpb["ptq"] > bpb["bf16"] * 1.05, bpb  # int2 PTQ clearly hurts
    assert bpb["qat"] < bpb["ptq"], bpb  # and QAT recovers part of it
    assert "| recovered by QAT |" in (cmp / "report.md").read_text()
    # the QAD arm distilled the fine-tuned bf16 arm's export, and has its own row and share
    qad_cfg = (cmp / "qad" / "config.yaml").read_text()
    assert "enabled: true" in qad_cfg.split("distill:")[1] and str(cmp / "bf16" / "export" / "hf") in qad_cfg
    assert results["qad"]["wikitext"]["bits_per_byte"] < bpb["ptq"]
    assert "| recovered by QAD |" in (cmp / "report.md").read_text()
    kd = [json.loads(l)["train/kd_loss"] for l in (cmp / "qad" / "metrics.jsonl").read_text().splitlines()]
    assert len(kd) == 3 and kd[-1] < kd[0]  # logged every 10 steps (configs/tiny/finetune.yaml)
    assert (cmp / "comparison.png").stat().st_size > 10_000
    assert "8da2w (int8 dynamic activations + int2 weights, group 32)" in out


def test_report_rows_for_a_qad_arm():
    res = {"bf16": {"wikitext": {"bits_per_byte": 1.0}}, "ptq": {"wikitext": {"bits_per_byte": 1.4}},
           "qat": {"wikitext": {"bits_per_byte": 1.1}}, "qad": {"wikitext": {"bits_per_byte": 1.04}}}
    r = rows(res)
    assert r["recovered by QAT"]["wikitext bits/byte"] == pytest.approx(0.75)
    assert r["recovered by QAD"]["wikitext bits/byte"] == pytest.approx(0.9)
    assert r["QAD degradation"]["wikitext bits/byte"] == pytest.approx(0.04)
    md = markdown(res, {"title": "t"})
    assert md.startswith("# bf16 vs PTQ vs QAT vs QAD: t") and "| QAD | n/a | n/a | n/a | n/a | 1.0400 |" in md


def test_arms_with_distillation_and_learned_scales(tmp_path, recipe):
    arms = recipe("compare").arms

    from qat.config import CompareConfig

    cfg = CompareConfig(output_dir=str(tmp_path), train_config="x.yaml", lora=True, lora_merged=True, qad=True,
                        learn_scales=True)
    got = arms(cfg, tmp_path)
    assert list(got) == ["bf16", "qat", "qad", "qat_ls", "qad_ls",
                         "bf16_lora", "qat_lora", "qad_lora", "qat_ls_lora", "qad_ls_lora"]
    teacher = f"distill.teacher={(tmp_path / 'bf16_lora' / 'export' / 'hf').resolve()}"
    assert "qat.learn_scales=true" in got["qad_ls_lora"] and teacher in got["qad_ls_lora"]
    assert "qat.lora_merged=true" in got["qat_ls_lora"] and "qat.learn_scales=true" not in got["qad_lora"]
    assert not any("distill" in o for o in got["qat_ls"])
    assert not any(o.startswith("model.path=") for o in got["qad_ls_lora"])
    # qat_from=bf16: every quantization-aware arm starts from its kind's fine-tuned bf16 arm, and a
    # QAD arm's teacher is that same starting model; the bf16 arms still start from the base
    cfg.qat_from = "bf16"
    got = arms(cfg, tmp_path)
    for suffix in ("", "_lora"):
        start = f"model.path={(tmp_path / f'bf16{suffix}' / 'export' / 'hf').resolve()}"
        assert all(start in got[f"{a}{suffix}"] for a in ("qat", "qad", "qat_ls", "qad_ls"))
        assert "distill.teacher=base" in got[f"qad{suffix}"] and "distill.teacher=base" in got[f"qad_ls{suffix}"]
        assert not any(o.startswith("model.path=") for o in got[f"bf16{suffix}"])
    # qat_overrides: the quantization-aware arms' own recovery stage, last so that they win; the
    # header says what they changed
    cfg.qat_overrides = ["training.steps=300", "lora.rank=64", "distill.weight=0.5"]
    got = arms(cfg, tmp_path)
    assert all(got[a][-3:] == cfg.qat_overrides for a in got if not a.startswith("bf16"))
    assert not any("training.steps=300" in o for o in got["bf16"] + got["bf16_lora"])
    compare = recipe("compare")

    cfg.train_config = str(ROOT / "configs/tiny/finetune.yaml")
    head = compare.header(cfg, tmp_path, "lora")["arms"]
    assert "start from the fine-tuned bf16 arm (its hf/ export) and train 300 more steps" in head
    assert "quantization-aware arms only: training.steps=300, lora.rank=64, distill.weight=0.5" in head
    assert "at T=1, weight 0.5 (the rest cross-entropy)" in head
    res = {k: {"wikitext": {"bits_per_byte": v}} for k, v in
           {"bf16": 1.0, "ptq": 1.4, "qat": 1.1, "qad": 1.04, "qat_ls": 1.08, "qad_ls": 1.02}.items()}
    md = markdown(res, {"title": "t"})
    assert md.startswith("# bf16 vs PTQ vs QAT vs QAD vs QAT+LS vs QAD+LS: t")
    assert "| recovered by QAT+LS | n/a | n/a | n/a | n/a | 80% |" in md and "| recovered by QAD+LS |" in md


def test_simulated_rows_are_labelled():
    res = {k: {"hellaswag": {"acc": 0.5}, "wikitext": {"bits_per_byte": 1.0}} for k in ("bf16", "ptq", "qat")}
    md = markdown(res, {"title": "t"}, simulated=True)
    assert "| PTQ (simulated) |" in md and "| QAT (simulated) |" in md and "| no quantization |" in md


def test_report_names_weights_left_in_high_precision(tmp_path, recipe):
    """A QAT arm trained with qat.allow_unquantized=true: the report, results.json and the W&B
    summary say what stayed high precision, read from the arm's verify.json (qat_coverage)."""
    compare = recipe("compare")
    from qat.config import CompareConfig

    cov = {"share": 0.2, "weight_tensors": 14, "fake_quantized_tensors": 8, "parameters": 1000,
           "fake_quantized_parameters": 200,
           "unquantized": {"*.mlp.experts.gate_up_proj": [4, 128, 64], "*.mlp.gate.weight": [4, 64]}}
    for arm, c in (("qat", cov), ("bf16", None)):
        (tmp_path / arm / "export").mkdir(parents=True)
        (tmp_path / arm / "export" / "verify.json").write_text(json.dumps({"qat_coverage": c}))
    cfg = CompareConfig(train_config="configs/tiny/full.yaml", output_dir=str(tmp_path), lora=False)
    coverage = compare.arm_coverage(cfg, tmp_path, "")
    assert coverage == {"qat": cov}
    from qat.eval.report import coverage_note

    note = coverage_note(coverage)
    assert note == ("QAT fake-quantized 20.0% of the decoder's weight parameters; left in high precision: "
                    "*.mlp.experts.gate_up_proj [4, 128, 64], *.mlp.gate.weight [4, 64]")
    assert coverage_note({"qat": dict(cov, share=1.0, unquantized={})}) is None
    res = {k: {"wikitext": {"bits_per_byte": 1.0}} for k in ("bf16", "ptq", "qat")}
    head = {"title": "t", "scheme": "8da4w", "high precision": note}
    md = compare.report(cfg, tmp_path, "full", res, head, False, coverage)
    assert f"- **high precision**: {note}" in md
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["qat_coverage"]["qat"]["share"] == 0.2 and record["header"]["high precision"] == note


def test_an_arm_config_that_cannot_train_is_refused_before_any_training(world, tmp_path, capsys, recipe):
    """learned scales need an intx scheme: the qat_ls arm's config is checked before the bf16 arm
    trains for hours."""
    compare = recipe("compare")

    with pytest.raises(SystemExit) as e:
        compare.main(["--config", str(ROOT / "configs/tiny/compare.yaml"), f"output_dir={tmp_path / 'c'}",
                      "scheme=float8", "qad=false", "learn_scales=true", f"eval.data_dir={world / 'eval'}"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert e.value.code == 2 and len(err) == 1 and "qat.learn_scales=true is for the intx schemes" in err[0], err
    assert not (tmp_path / "c").exists()


def test_executorch_bits_per_byte_is_a_column_with_its_recovery():
    lm = {"wikitext": {"bits_per_byte": 1.0}}
    res = {"bf16": {**lm, "executorch": {"bits_per_byte": 1.0}}, "ptq": {**lm, "executorch": {"bits_per_byte": 1.5}},
           "qat": {**lm, "executorch": {"bits_per_byte": 1.1}}}
    r = rows(res)
    assert r["recovered by QAT"]["ExecuTorch bits/byte"] == pytest.approx(0.8)
    assert r["PTQ degradation"]["ExecuTorch bits/byte"] == pytest.approx(0.5)
    md = markdown(res, {"title": "t"})
    assert "| ExecuTorch bits/byte |" in md and md.splitlines()[-3].endswith("| 80% |")
    assert "ExecuTorch" not in markdown({k: {"wikitext": v["wikitext"]} for k, v in res.items()}, {"title": "t"})
