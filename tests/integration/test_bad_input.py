"""Each mistake gets one clear line on stderr, exit status 2, and nothing written is damaged."""

from pathlib import Path
import json
import shutil
import subprocess
import sys

import pytest


ROOT = Path(__file__).resolve().parents[2]


def fails_with(capsys, argv, needle, *, recipe):
    with pytest.raises(SystemExit) as e:
        recipe("train").main(["--config", str(ROOT / "configs/tiny/full.yaml"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err


@pytest.mark.parametrize("extra, needle", [
    (["qat.enabled=true", "qat.scheme=int4wo"], "unknown QAT scheme 'int4wo'"),
    (["qat.enabled=true", "qat.scheme=8da4w", "qat.group_size=96"],
     "qat.group_size=96 does not divide in_features=128 of layer model.layers.0.self_attn.q_proj"),
    (["lora.enabled=true", "lora.target_modules=[query,value]"], "lora.target_modules ['query', 'value'] match no Linear"),
    (["data.seq_len=4096"], "data.seq_len=4096 exceeds the model's max_position_embeddings=512"),
    (["optimizer.betas1=0.9"], "unknown config key 'optimizer.betas1'"),
    (["distill.enabled=true", "distill.weight=2"], "distill.weight=2.0 must be at most 1"),
    (["distill.enabled=true", "distill.teacher=/nonexistent/teacher"],
     "distill.teacher='/nonexistent/teacher' is not a loadable HF model"),
    (["qat.enabled=true", "qat.scheme=float8", "qat.backend=torchao"],
     "scheme 'float8' needs a CUDA GPU with float8 support"),
    (["data.packing=rows"], "data.packing='rows' is not one of documents, concat, pad"),
    (["data.num_proc=0"], "data.num_proc=0 must be at least 1"),
    (["data.shuffle_buffer=0"], "data.shuffle_buffer=0 must be at least 1"),
    (["data.sources.1.streaming=true"], "data.sources[1].streaming=True but data.sources[0].streaming=False"),
    (["data.sources.0.weight=2"], "data.sources: weight is set on sources [0] only"),
    (["data.sources.0.weight=-1", "data.sources.1.weight=1"], "data.sources[0].weight=-1.0 must be greater than 0"),
    (["data.sources=[]"], "data.sources is empty: give at least one dataset"),
    (["logging.wandb.projct=x"], "unknown config key 'logging.wandb.projct'"),
    (["nosection.key=1"], "unknown config key 'nosection'"),
])
def test_config_mistakes(capsys, world, tmp_path, extra, needle, base_overrides, recipe):
    fails_with(capsys, base_overrides(world, tmp_path) + extra, needle, recipe=recipe)
    assert not (tmp_path / "checkpoints").exists()


def test_missing_data_file_and_column(capsys, world, tmp_path, base_overrides, recipe):
    fails_with(capsys, base_overrides(world, tmp_path) + [f"data.sources=[{{path: {tmp_path}/none.jsonl}}]"],
               "data.sources[0].path: no such file or folder", recipe=recipe)
    fails_with(capsys, base_overrides(world, tmp_path) + [
        f"data.sources=[{{path: {world}/data/finetune.jsonl, kind: text}}]"], "has no column 'text' (columns: messages)", recipe=recipe)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory, base_overrides, run_train):
    out = tmp_path_factory.mktemp("trained")
    run_train(base_overrides(world, out) + ["training.steps=2"], 1)
    return out


def test_resume_from_incomplete_and_corrupt_checkpoints(capsys, world, trained, tmp_path, base_overrides, recipe):
    good = trained / "checkpoints" / "step-000002"
    before = sorted((p.name, p.stat().st_size) for p in good.iterdir())
    incomplete = tmp_path / "step-000002"
    shutil.copytree(good, incomplete)
    (incomplete / "meta.json").unlink()
    fails_with(capsys, base_overrides(world, tmp_path / "o") + [f"checkpoint.resume={incomplete}"],
               "is not a complete checkpoint (missing meta.json)", recipe=recipe)
    (incomplete / "meta.json").write_text("{not json")
    fails_with(capsys, base_overrides(world, tmp_path / "o") + [f"checkpoint.resume={incomplete}"],
               "is corrupt: meta.json does not parse", recipe=recipe)
    fails_with(capsys, base_overrides(world, tmp_path / "o") + [f"checkpoint.resume={tmp_path}/step-000009"],
               "does not exist", recipe=recipe)
    # a starting run never overwrites an earlier run's checkpoints
    fails_with(capsys, base_overrides(world, trained), "already holds checkpoints; set checkpoint.resume=auto", recipe=recipe)
    assert sorted((p.name, p.stat().st_size) for p in good.iterdir()) == before


def test_truncated_shards_fail_cleanly_through_torchrun(world, trained, tmp_path, base_overrides, run_train):
    """Corruption DCP finds only while loading: one error line; the worker ends its torchrun with
    SIGKILL (status -9, so torchrun prints no report of its own); no new checkpoint written."""
    bad = tmp_path / "run" / "checkpoints" / "step-000002"
    shutil.copytree(trained / "checkpoints" / "step-000002", bad)
    shard = next(bad.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    proc = run_train(base_overrides(world, tmp_path / "run") + ["checkpoint.resume=auto", "training.steps=3"],
                     2, check=False)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "is corrupt or does not match this model" in errors[0], proc.stderr[-2000:]
    # torchrun printed the workers' line instead of its ChildFailedError report (qat/torchrun_errors.py)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "FAILED" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "checkpoints" / "step-000003").exists()


def test_help_explains_the_recipe(env):
    out = subprocess.run([sys.executable, str(ROOT / "recipes/train.py"), "--help"], env=env(),
                         capture_output=True, text=True, check=True).stdout
    assert "torchrun" in out and "key=value" in out and "checkpoint.resume=auto" in out


def test_wrong_scheme_on_resume_is_refused(capsys, world, trained, base_overrides, recipe):
    meta = json.loads((trained / "checkpoints/step-000002/meta.json").read_text())
    assert meta["qat"] is None
    fails_with(capsys, base_overrides(world, trained) + [
        "checkpoint.resume=auto", "training.steps=3", "qat.enabled=true", "qat.scheme=8da4w"],
               "the checkpoint was trained with qat=None", recipe=recipe)


def test_malformed_yaml_and_overrides(capsys, world, tmp_path, base_overrides, recipe):
    cases = {"a: [1,\n": "is not valid YAML at line 2, column 1", "- a\n- b\n": "must hold a mapping of config keys"}
    for text, needle in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(SystemExit):
            recipe("train").main(["--config", str(bad)])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    fails_with(capsys, base_overrides(world, tmp_path) + ["optimizer.lr"], "override 'optimizer.lr' is not key=value", recipe=recipe)
    fails_with(capsys, base_overrides(world, tmp_path) + ["optimizer.betas=[0.9,"], "override optimizer.betas: the value", recipe=recipe)


def test_missing_and_corrupt_model_folders(capsys, world, tmp_path, base_overrides, recipe):
    fails_with(capsys, base_overrides(world, tmp_path / "a") + [f"model.path={tmp_path}/nowhere"], "no such folder", recipe=recipe)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(world / "model", corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    fails_with(capsys, base_overrides(world, tmp_path / "b") + [f"model.path={corrupt}"],
               f"model.path='{corrupt}': its weights do not load", recipe=recipe)


@pytest.mark.parametrize("args, needle", [(["--limit", "-3"], "--limit=-3.0 must be greater than 0"),
                                          (["--batch-size", "0"], "--batch-size=0 must be at least 1"),
                                          (["--dtype", "fp8"], "--dtype='fp8' is not one of auto")])
def test_evaluate_options_out_of_range(world, tmp_path, args, needle, env):
    p = subprocess.run([sys.executable, str(ROOT / "recipes/evaluate.py"), "--model", str(world / "model"), *args,
                        "--out", str(tmp_path / "r.json")], env=env(), capture_output=True, text=True, timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("error: " + needle), p.stderr[-2000:]
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("name, content, kind, needle", [
    ("broken.jsonl", '{"text": "a b c"}\n{"text": broken\n', "text",
     "does not parse: JSON parse error: Invalid value. in row 1 (line 2)"),
    ("numbers.jsonl", '{"text": 3}\n{"text": 4}\n', "text", "column 'text' holds int64, not text"),
    ("nulls.jsonl", '{"text": "a"}\n{"text": null}\n', "text",
     "1 row(s) of column 'text' are null, the first at row 1"),
    ("empty.jsonl", "", "text", "empty.jsonl is empty"),
    ("chat.jsonl", '{"messages": "hello"}\n', "chat", "column 'messages' holds string, not conversations"),
])
def test_malformed_data_files(capsys, world, tmp_path, name, content, kind, needle, base_overrides, recipe):
    (tmp_path / name).write_text(content)
    fails_with(capsys, base_overrides(world, tmp_path / "out") + [
        f"data.sources=[{{path: {tmp_path / name}, kind: {kind}}}]"], needle, recipe=recipe)
    assert not (tmp_path / "out" / "checkpoints").exists()


def model_copy(world, tmp_path, edit):
    folder = tmp_path / "model"
    shutil.copytree(world / "model", folder)
    edit(folder)
    return folder


def set_chat_template(template):
    def edit(folder):
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        for f in folder.glob("chat_template.*"):
            f.unlink()
    return edit


def drop_tokenizer(folder):
    for f in folder.glob("tokenizer*"):
        f.unlink()


@pytest.mark.parametrize("edit, needle", [
    (lambda f: (f / "tokenizer.json").write_text("{cut sho"), "tokenizer.json is corrupt"),
    (lambda f: (f / "tokenizer_config.json").write_text("{cut sho"), "tokenizer_config.json is corrupt"),
    (drop_tokenizer, "its tokenizer does not load (ValueError: Couldn't instantiate the backend tokenizer"),
    (set_chat_template("{{ messages | nosuchfilter }}"),
     "the tokenizer's chat template fails on the conversation [{'role': 'system'"),
    (set_chat_template("{{ raise_exception('Conversation roles must alternate') }}"),
     "TemplateError: Conversation roles must alternate; fix chat_template in the model folder"),
])
def test_broken_tokenizer_folders(capsys, world, tmp_path, edit, needle, base_overrides, recipe):
    folder = model_copy(world, tmp_path, edit)
    fails_with(capsys, base_overrides(world, tmp_path / "out") + [f"model.path={folder}"], needle, recipe=recipe)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_output_paths_that_are_files_are_refused_and_left_intact(capsys, world, trained, tmp_path, recipe):
    """convert --out, evaluate --out and compare's output_dir on an existing file: one line, and the
    file is untouched."""
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    calls = [(recipe("convert").main, ["--checkpoint", str(trained), "--out", str(victim)], "--out: "),
             (recipe("evaluate").main, ["--model", str(world / "model"), "--out", str(victim / "r.json")], "--out: "),
             (recipe("compare").main, ["--config", str(ROOT / "configs/tiny/compare.yaml"), f"output_dir={victim}"],
              "output_dir: ")]
    for main, argv, needle in calls:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: " + needle), err
        assert "is a file" in err[0] and "choose another path" in err[0]
    assert victim.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("split, text, needle", [
    ("hellaswag/validation.jsonl", '{"ctx": broken\n', "validation.jsonl, line 1: does not parse"),
    ("wikitext/test.jsonl", '{"page": "a"}\n{"text": "b"}\n', "test.jsonl, line 2: lacks page"),
    ("wikitext/train.jsonl", "", "train.jsonl is empty"),
])
def test_local_eval_data_is_checked_per_line(world, tmp_path, split, text, needle):
    from qat.eval.harness import local_group_yaml
    from qat.errors import UserError

    data = tmp_path / "eval"
    shutil.copytree(world / "eval", data)
    (data / split).write_text(text)
    with pytest.raises(UserError, match="^local eval data .*" + needle.replace(".", r"\.")):
        local_group_yaml(data)


def test_lm_eval_model_folders(world, tmp_path):
    """What lm-eval cannot load is one line: corrupt weights, a tokenizer without pad and eos."""
    from qat.eval.harness import load_lm
    from qat.errors import UserError

    def cut_weights(folder):
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])

    with pytest.raises(UserError, match="lm-eval cannot load it .SafetensorError: .*convert or copy it again"):
        load_lm(model_copy(world, tmp_path / "a", cut_weights))

    def no_pad_no_eos(folder):
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.update(pad_token=None, eos_token=None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        (folder / "special_tokens_map.json").unlink(missing_ok=True)

    with pytest.raises(UserError, match="its tokenizer has neither a pad nor an eos token"):
        load_lm(model_copy(world, tmp_path / "b", no_pad_no_eos))
