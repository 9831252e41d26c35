"""GGUF export checked by llama.cpp itself: a short q4_0 QAT run on the tiny world, convert --gguf,
then llama.cpp (llama-cpp-python) loads the file, tokenizes the held-out text as our tokenizer
does, and predicts the same next token as our converted (fake-quantized) model."""

import json
import math

import pytest
import torch


gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def q4_export(world, tmp_path_factory, base_overrides, run_train, convert_cli):
    run = tmp_path_factory.mktemp("gguf") / "q4_0"
    run_train(base_overrides(world, run) + ["qat.enabled=true", "qat.scheme=q4_0"])
    convert_cli(["--checkpoint", run, "--gguf", "f32", "--out", run / "export"])
    return run


def heldout_texts(world) -> list[str]:
    return [json.loads(line)["text"] for line in (world / "data" / "heldout_text.jsonl").read_text().splitlines()]


def test_gguf_holds_the_trained_codes_bit_for_bit(q4_export):
    """Every Q4_0 tensor dequantizes (gguf's own reader and dequantizer) to exactly the weights the
    fake-quantized forward multiplies, and its bytes are gguf's reference quantization of them."""
    from qat.convert.gguf_archs import gguf_name
    from qat.convert.gguf_writer import permute_rows
    from qat.convert.transforms import load_trained
    from qat.fake_quant import QATLinear

    model, cfg, _, _ = load_trained(next((q4_export / "checkpoints").iterdir()))
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    tensors = {t.name: t for t in gguf.GGUFReader(q4_export / "export" / "gguf" / "model-q4_0.gguf").tensors}
    checked = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QATLinear):
            continue
        w = mod.weight.detach()
        proj = name.split(".")[-1]
        if proj in heads:
            w = permute_rows(w, heads[proj])
        t = tensors[gguf_name(name + ".weight")]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(w.shape)
        assert torch.equal(values, mod.weight_fq(w)[0])
        assert (t.data.reshape(-1) == gguf.quants.quantize(w.numpy(), t.tensor_type).reshape(-1)).all()
        checked += 1
    assert checked == 14
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def our_nats(model, ids: list[int], n_ctx: int) -> float:
    """Our converted model's NLL of ids[1:], in the windows gguf_check.bits_per_byte scores."""
    nats, start = 0.0, 0
    while start < len(ids) - 1:
        window = ids[start:start + n_ctx]
        with torch.no_grad():
            lg = model(torch.tensor([window])).logits[0].double()
        nats -= float(torch.log_softmax(lg[:-1], -1).gather(-1, torch.tensor(window[1:])[:, None]).sum())
        start += n_ctx - 1
    return nats


def test_llama_cpp_tokenizes_and_predicts_as_our_converted_model(q4_export, world, tok):
    """Tolerance: llama.cpp quantizes activations with its SIMD rounding and sums blocks in its own
    order, so logits differ by float noise (under 0.01 here): top-1 agreement >= 99%, and bits per
    byte within 1%."""
    from qat.convert.gguf_check import bits_per_byte, load, logits, tokenize
    from qat.convert.simulated import load_simulated

    n_ctx = 512  # the tiny model's max_position_embeddings; longer texts are cut (top-1) or windowed (bpb)
    llm = load(q4_export / "export" / "gguf" / "model-q4_0.gguf", n_ctx=n_ctx)
    ours = load_simulated(q4_export / "export" / "hf", "q4_0", None)
    agree = total = 0
    nats = 0.0
    texts = heldout_texts(world)
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tokenize(llm, text) == ids
        nats += our_nats(ours, ids, n_ctx)
        ids = ids[:n_ctx]
        with torch.no_grad():
            ref = ours(torch.tensor([ids])).logits[0].double()
        got = torch.from_numpy(logits(llm, ids)).double()
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
        assert float((got - ref).abs().max()) < 0.05
    assert agree / total >= 0.99, (agree, total)
    ours_bpb = nats / math.log(2) / sum(len(t.encode()) for t in texts)
    theirs = bits_per_byte(llm, texts, n_ctx)
    llm.close()
    assert abs(theirs["bits_per_byte"] - ours_bpb) <= 0.01 * ours_bpb, (theirs, ours_bpb)
    report = json.loads((q4_export / "export" / "verify.json").read_text())
    assert report["gguf"]["llama_cpp_vs_simulated"]["top1_agreement"] >= 0.99
    assert report["gguf"]["files"]["model-q4_0.gguf"]["tensors"] == {"q4_0": 14, "f32": 7}


def test_gguf_refusals(q4_export, world, tmp_path, convert_cli, base_overrides, run_train):
    p = convert_cli(["--checkpoint", q4_export, "--gguf", "f16", "--only-hf", "--out", tmp_path / "a"], check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
        "error: --gguf writes quantized codes; it cannot go with --only-hf"
    assert not (tmp_path / "a").exists()


def test_compare_reports_llama_cpp_bits_per_byte(world, tmp_path, base_overrides, env):
    """compare with gguf on: bf16 and q4_0 QAT arms, each .gguf evaluated by llama.cpp itself."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "cmp"
    train = [o for o in base_overrides(world, out) if not o.startswith("output_dir=")]
    cfg = {"output_dir": str(out), "train_config": str(root / "configs/tiny/full.yaml"), "train_overrides": train,
           "scheme": "q4_0", "group_size": None, "qad": False, "learn_scales": False, "gguf": "f32",
           "gguf_texts": str(world / "data/heldout_text.jsonl"),
           "eval": {"tasks": "local", "data_dir": str(world / "eval"), "limit": 20, "device": "cpu",
                    "dtype": "float32"}, "wandb": {"enabled": False}}
    (tmp_path / "cmp.yaml").write_text(json.dumps(cfg))
    p = subprocess.run([sys.executable, str(root / "recipes/compare.py"), "--config", str(tmp_path / "cmp.yaml")],
                       cwd=root, env=env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["llama_cpp"]
    assert set(rows) == {"bf16", "ptq", "qat"}
    assert rows["bf16"]["model"].endswith("bf16/export/gguf/model-f32.gguf")
    assert rows["ptq"]["model"].endswith("bf16/export/gguf/model-q4_0.gguf")
    assert rows["qat"]["model"].endswith("qat/export/gguf/model-q4_0.gguf")
    assert len({r["tokens"] for r in rows.values()}) == 1  # the same text, the same tokens
    assert all(0 < r["bits_per_byte"] < 8 for r in rows.values())
    report = (out / "report.md").read_text()
    assert "## llama.cpp (GGUF q4_0): bits per byte" in report
    assert f"| PTQ | {rows['ptq']['bits_per_byte']:.4f} |" in report


ARCH_CONFIGS = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": {}, "qwen3": {},
    # 7 layers: layer 5 is global, the others slide over 16 tokens (the held-out texts are longer)
    "gemma3_text": dict(num_hidden_layers=7, query_pre_attn_scalar=32, sliding_window=16, tie_word_embeddings=True),
    "gemma2": dict(num_hidden_layers=3, query_pre_attn_scalar=32, sliding_window=16, tie_word_embeddings=True),
    "starcoder2": {},  # LayerNorms and Linears with biases, c_fc / c_proj
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
}


def random_model(kind: str, world):
    """A random tiny model of `kind` with the world's vocabulary, its norm weights and biases
    randomized too (Gemma stores 1 + w: a norm of ones would hide a missing offset)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    world_cfg = json.loads((world / "model" / "config.json").read_text())
    ids = {k: world_cfg[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{**kw, **ids, **ARCH_CONFIGS[kind]})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
            elif name.endswith(".bias"):  # biases of norms and projections (zero at init)
                p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("kind", ARCH_CONFIGS)
def test_llama_cpp_runs_each_architecture_as_transformers_does(kind, world, tok, tmp_path):
    """An f32 export of a random model per architecture: llama.cpp's logits equal transformers' up
    to float arithmetic, so its metadata, names and layouts are right. Measured max difference:
    about 1e-7 for Llama, Qwen, Mixtral and Qwen3-MoE, 5e-6 for StarCoder2, 2.6-3.6e-4 for Gemma 2
    and 3.5-5.1e-4 for Gemma 3 (llama.cpp's CPU GELU reads an f16 table), on logits up to 0.8; the
    bound is 5e-3."""
    from qat.convert.gguf_check import load, logits, tokenize
    from qat.convert.gguf_writer import write_gguf

    model = random_model(kind, world)
    write_gguf(model, tok, tmp_path / "m.gguf", None, set(), "f32", kind)
    llm = load(tmp_path / "m.gguf", n_ctx=256)
    checked = 0
    for text in heldout_texts(world)[:4]:
        ids = tok(text)["input_ids"][:256]
        assert tokenize(llm, text)[:256] == ids
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0]
        got = torch.from_numpy(logits(llm, ids))
        assert float((got - ref).abs().max()) < 5e-3, kind
        top2 = ref.topk(2, -1).values
        clear = top2[:, 0] - top2[:, 1] > 1e-2  # a random model's near-ties may flip within the bound
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
        checked += int(clear.sum())
    llm.close()
    assert checked >= 100, checked


# (architecture, Q4_0 tensors, f32 tensors) of the trained runs below
TRAINED = {"gemma3_text": (49, 44),  # 7 blocks x 7 Linears; 7 x 6 norms, the final norm, the tied embedding
           # 2 blocks x (4 attention Linears + 3 expert tensors); 2 x 4 norms + 2 routers, final norm,
           # embedding, output
           "qwen3_moe": (14, 13)}


@pytest.mark.parametrize("kind", TRAINED)
def test_a_q4_0_run_exports_its_codes_and_llama_cpp_agrees(kind, world, tok, tmp_path, base_overrides, run_train,
                                                           convert_cli):
    """Gemma 3 and Qwen3-MoE end to end: q4_0 QAT from the random models above (Gemma: tied head,
    7 layers with one global; Qwen3-MoE: its experts fake-quantized per expert), convert --gguf,
    then llama.cpp against our converted (fake-quantized) model on 4 held-out texts. Four steps
    leave a random model's logits flat (within about 0.3), so near-ties flip: convert's probe
    measured 98.0% top-1 for Gemma 3 at a max difference of 0.0066. The check: max difference
    under 0.05 (the trained Llama test's bound; measured 0.006-0.010 for Gemma 3, 1e-4 for
    Qwen3-MoE, whose experts are weight-only), the same top-1 wherever our top two differ by more
    than 0.025 (over twice the largest difference). The expert tensors dequantize to exactly the
    fake-quantized expert weights."""
    import shutil

    from qat.convert.gguf_check import load, logits
    from qat.convert.simulated import load_simulated
    from qat.convert.transforms import load_trained
    from qat.gguf_quant import GGUFWeight

    folder = tmp_path / kind
    random_model(kind, world).save_pretrained(folder)
    for f in (world / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    run = tmp_path / "run"
    run_train(base_overrides(world, run) + [f"model.path={folder}", "training.steps=4", "qat.enabled=true",
                                            "qat.scheme=q4_0", "qat.group_size=null"])
    convert_cli(["--checkpoint", run, "--gguf", "f32", "--out", run / "export"])
    report = json.loads((run / "export" / "verify.json").read_text())["gguf"]
    q4, f32 = TRAINED[kind]
    assert report["files"]["model-q4_0.gguf"]["tensors"] == {"q4_0": q4, "f32": f32}
    path = run / "export" / "gguf" / "model-q4_0.gguf"
    if kind == "qwen3_moe":
        trained = load_trained(next((run / "checkpoints").iterdir()))[0]
        tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
        for i, layer in enumerate(trained.model.layers):
            gate, up = layer.mlp.experts.gate_up_proj.detach().chunk(2, dim=1)
            for name, w in (("ffn_gate_exps", gate), ("ffn_up_exps", up),
                            ("ffn_down_exps", layer.mlp.experts.down_proj.detach())):
                t = tensors[f"blk.{i}.{name}.weight"]
                assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
                got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(w.shape)
                assert torch.equal(got, torch.stack([GGUFWeight("q4_0")(e)[0] for e in w]))
    llm = load(path, n_ctx=256)
    ours = load_simulated(run / "export" / "hf", "q4_0", None)
    checked = 0
    for text in heldout_texts(world)[:4]:
        ids = tok(text)["input_ids"][:256]
        with torch.no_grad():
            ref = ours(torch.tensor([ids])).logits[0]
        got = torch.from_numpy(logits(llm, ids))
        assert float((got - ref).abs().max()) < 0.05
        top2 = ref.topk(2, -1).values
        clear = top2[:, 0] - top2[:, 1] > 0.025
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
        checked += int(clear.sum())
    llm.close()
    assert checked >= 100, checked
