"""convert on world-size-2 checkpoints (full and LoRA, bf16 and QAT), in one process and sharded
under torchrun; evaluate; the lm_eval CLI."""

from pathlib import Path
import json
import subprocess
import sys

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


ARMS = {
    "full_bf16": [],
    "full_qat": ["qat.enabled=true", "qat.scheme=8da2w", "qat.group_size=32"],
    "lora_bf16": ["lora.enabled=true", "lora.rank=8"],
    "lora_qat": ["lora.enabled=true", "lora.rank=8", "qat.enabled=true", "qat.scheme=intx4-weight-only",
                 "qat.group_size=32"],
}


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory, base_overrides, env, free_port, run_train, convert_cli):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for arm, extra in ARMS.items():
        run_train(base_overrides(world, root / arm) + extra + ["training.steps=4"], 2)
        convert_cli(["--checkpoint", root / arm, "--scheme", "8da4w"] if "bf16" in arm else ["--checkpoint", root / arm])
        out[arm] = root / arm / "export" / "step-000004"
    return out


@pytest.mark.parametrize("arm", list(ARMS))
def test_export_folders_load_and_verify(exported, world, arm, logits, probe, base_overrides, tmp_path):
    out = exported[arm]
    report = json.loads((out / "verify.json").read_text())
    assert report["reload_equal"] is True
    x = probe(world)
    hf, q = logits(out / "hf", x), logits(out / "quantized", x)
    assert hf.shape == q.shape and not torch.equal(hf, q)
    from transformers import AutoModelForCausalLM

    qm = AutoModelForCausalLM.from_pretrained(out / "quantized")
    assert type(qm.model.layers[0].mlp.down_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(qm.lm_head.weight) is torch.nn.Parameter  # lm_head stays high precision
    if "qat" in arm:
        assert report["mode"] == "qat" and report["converted_equals_fake_quant"] is True
        assert report["converted_vs_fake_quant"]["max_abs_diff"] == 0.0
    else:
        assert report["mode"] == "ptq" and report["scheme"]["scheme"] == "8da4w"
    # the report compares the two folders' forwards on convert's probe (the run's first rows, padded)
    from qat.config import load_config
    from qat.convert.pipeline import probe_batch
    from qat.model import load_tokenizer

    cfg = load_config(str(ROOT / "configs/tiny/full.yaml"), base_overrides(world, tmp_path))
    ids = probe_batch(load_tokenizer(str(world / "model"), need_pad=True), cfg)
    q_out, hf_out = logits(out / "quantized", ids).double(), logits(out / "hf", ids).double()
    assert report["converted_vs_unquantized"] == {
        "rel_error": float((q_out - hf_out).norm() / hf_out.norm()), "max_abs_diff": float((q_out - hf_out).abs().max()),
        "top1_agreement": float((q_out.argmax(-1) == hf_out.argmax(-1)).double().mean())}


@pytest.mark.parametrize("arm", ["lora_bf16", "lora_qat"])
def test_merged_equals_base_plus_adapter(exported, world, arm, logits, probe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = exported[arm]
    base = AutoModelForCausalLM.from_pretrained(world / "model")
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    x = probe(world)
    with torch.no_grad():
        adapted = peft_model(x).logits
    merged = logits(out / "hf", x)
    assert torch.allclose(adapted, merged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, logits(world / "model", x), atol=1e-4)  # the adapter did train


def test_lm_eval_cli_runs_on_the_quantized_folder(exported, world, tmp_path, env):
    from qat.eval.harness import GROUP, local_group_yaml

    (tmp_path / f"{GROUP}.yaml").write_text(local_group_yaml(world / "eval"))
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={exported['full_qat'] / 'quantized'},dtype=float32", "--tasks", GROUP,
           "--include_path", str(tmp_path), "--limit", "8", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert 0.0 <= res["hellaswag"]["acc,none"] <= 1.0
    assert res["wikitext"]["bits_per_byte,none"] > 0
    # our harness indexes only lm-eval's hellaswag and wikitext folders, the CLI every task: the
    # same task logic gives the same numbers
    from qat.eval.harness import evaluate

    ours = evaluate(str(exported["full_qat"] / "quantized"), data_dir=world / "eval", limit=8, batch_size=1,
                    dtype="float32")
    for task, metric in [("hellaswag", "acc"), ("hellaswag", "acc_norm"), ("wikitext", "bits_per_byte"),
                         ("wikitext", "word_perplexity")]:
        assert ours[task][metric] == res[task][f"{metric},none"], (task, metric)


def test_evaluate_recipe_writes_results(exported, world, tmp_path, env):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "recipes/evaluate.py"), "--model",
                           str(exported["full_bf16"] / "quantized"), "--tasks", "local", "--data-dir",
                           str(world / "eval"), "--limit", "8", "--dtype", "float32", "--out", str(out)],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # lm-eval's and datasets' bars into a pipe: plain lines (qat.progress.plain_library_bars)
    assert "\r" not in proc.stderr and "\nRunning loglikelihood requests: 100%|" in proc.stderr, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"hellaswag", "wikitext"}
    assert set(res["hellaswag"]) == {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    assert set(res["wikitext"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    # the numbers are lm-eval's over the 8 documents: accuracies count documents, the stderr is the
    # sample one, and bits per byte is log2 of the byte perplexity
    hs, wt = res["hellaswag"], res["wikitext"]
    assert (hs["acc"] * 8).is_integer() and (hs["acc_norm"] * 8).is_integer()
    assert hs["acc_stderr"] == pytest.approx((hs["acc"] * (1 - hs["acc"]) / 7) ** 0.5, rel=1e-12)
    assert wt["byte_perplexity"] == pytest.approx(2 ** wt["bits_per_byte"], rel=1e-12)


def test_convert_bad_input(exported, world, tmp_path, env, free_port, convert_cli):
    p = convert_cli(["--checkpoint", tmp_path], check=False)
    assert p.returncode == 2 and "is not a checkpoint" in p.stderr.strip().splitlines()[-1]
    ckpt = exported["full_qat"].parent.parent / "checkpoints" / "step-000004"
    p = convert_cli(["--checkpoint", ckpt, "--scheme", "8da4w", "--out", tmp_path / "x"], check=False)
    assert p.returncode == 2 and "trained with QAT scheme '8da2w'" in p.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x-*"))


def test_eval_bad_input(exported, world, tmp_path, env):
    model = exported["full_bf16"] / "hf"
    for args, needle in [(["--tasks", "local", "--data-dir", str(tmp_path)], "local eval data missing"),
                         (["--tasks", "local"], "tasks=local needs a data folder (--data-dir)"),
                         (["--tasks", "hellaswagg"], "unknown lm-eval task(s): hellaswagg")]:
        p = subprocess.run([sys.executable, str(ROOT / "recipes/evaluate.py"), "--model", str(model), *args,
                            "--out", str(tmp_path / "r.json")], env=env(), capture_output=True, text=True)
        assert p.returncode == 2 and needle in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
        assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("arm", list(ARMS))
def test_sharded_convert_equals_one_process(exported, world, tmp_path, arm, env, free_port, assert_same_export, convert_cli):
    """torchrun, 2 ranks, one decoder block each: neither rank ever holds the whole model."""
    ckpt = exported[arm].parent.parent / "checkpoints" / "step-000004"
    extra = ["--scheme", "8da4w"] if "bf16" in arm else []
    convert_cli(["--checkpoint", ckpt, "--out", tmp_path / "out", *extra], nproc=2)
    assert_same_export(exported[arm], tmp_path / "out", world)


def test_sharded_convert_tied_embeddings(world, tmp_path, base_overrides, env, free_port, run_train, assert_same_export, convert_cli, folder_tensors):
    """Llama-3.2-1B and Qwen3-1.7B tie lm_head to the embedding, which ranks 0 and 1 own apart:
    the base load, the adapter and both folders must still match one process, in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(world / "model")
    base.config.tie_word_embeddings = True
    base.lm_head.weight = base.model.embed_tokens.weight
    base.save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(world / "model").save_pretrained(tmp_path / "tied")
    overrides = base_overrides(world, tmp_path / "run") + [f"model.path={tmp_path / 'tied'}", "training.steps=2",
                                                          "lora.enabled=true", "lora.rank=8", "qat.enabled=true",
                                                          "qat.scheme=8da4w", "qat.group_size=32"]
    run_train(overrides, 2)
    # bf16 export: RoPE's inv_freq must stay fp32 as from_pretrained keeps it, or reload differs
    convert_cli(["--checkpoint", tmp_path / "run", "--out", tmp_path / "local", "--dtype", "bf16"])
    convert_cli(["--checkpoint", tmp_path / "run", "--out", tmp_path / "sharded", "--dtype", "bf16"], nproc=2)
    assert "lm_head.weight" not in folder_tensors(tmp_path / "sharded" / "hf")
    assert json.loads((tmp_path / "local" / "verify.json").read_text())["reload_equal"] is True
    assert_same_export(tmp_path / "local", tmp_path / "sharded", world)


def test_sharded_convert_bad_input(exported, tmp_path, env, free_port, convert_cli):
    ckpt = exported["full_qat"].parent.parent / "checkpoints" / "step-000004"
    p = convert_cli(["--checkpoint", ckpt, "--out", tmp_path / "x"], check=False, nproc=3)
    assert p.returncode != 0
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert errors == ["error: convert under torchrun needs at most one rank per decoder block: the model has "
                      "2 blocks, the launch has 3 ranks"]
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x-*"))


def test_sharded_convert_reports_an_error_seen_by_one_rank(exported, world, tmp_path, env, free_port, convert_cli):
    """Only rank 1 reads layer 1's base weights: its error is printed once (by rank 0) and every
    rank exits 2 before any output exists."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(world / "model", base)
    weights = load_file(base / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    ckpt = tmp_path / "ckpt" / "step-000004"
    shutil.copytree(exported["lora_bf16"].parent.parent / "checkpoints" / "step-000004", ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["model"]["path"] = str(base)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    p = convert_cli(["--checkpoint", ckpt, "--out", tmp_path / "x"], check=False, nproc=2)
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert p.returncode != 0 and len(errors) == 1, p.stderr[-3000:]
    assert errors[0].startswith("error: rank 1: model.path=") and "model.layers.1.mlp.down_proj.weight" in errors[0]
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x-*"))
