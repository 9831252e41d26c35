"""The defaults work on any HF causal LM: tiny random configs of several architectures go through
train (QAT 8da4w + LoRA, default targets and attention), convert and evaluate; the MoE ones
(Qwen3-MoE, Mixtral, DeepSeek-V3, GLM-4.5-MoE) at world size 2 with their experts fake-quantized
and converted; weights
that no scheme covers (GPT-2's Conv1D) are refused in one line unless qat.allow_unquantized=true."""

from pathlib import Path
import json
import shutil
import sys

import pytest
import torch


ROOT = Path(__file__).resolve().parents[2]

# Dimensions are multiples of 32 so that group size 32 divides every in_features.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, max_position_embeddings=512, tie_word_embeddings=False)
ARCHS = {
    "llama": {},
    "qwen3": {},
    "gemma2": dict(query_pre_attn_scalar=32, sliding_window=32),
    "gemma3_text": dict(query_pre_attn_scalar=32, sliding_window=32),
    "phi3": dict(head_dim=None),  # phi3 derives head_dim; it fuses qkv_proj and gate_up_proj
    "starcoder2": {},  # c_fc / c_proj
    # transformers rejects sdpa for gpt-oss (attention sinks): the default attention must let it pick;
    # its experts are stored transposed ([E, in, out]) with biases, and convert simulates them
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=None),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
}
MOE_WORLD2 = ("qwen3_moe", "mixtral")
# The DeepSeek-V3 family (MLA attention, routed + shared experts, a bare-weight router with a
# score-correction bias, a dense first block) and GLM-4.5-MoE; every in_features divides by 32.
SPARSE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
              n_group=1, topk_group=1, n_shared_experts=1)
FAMILIES = {
    "deepseek_v3": dict(SPARSE, num_key_value_heads=2, head_dim=None, q_lora_rank=32, kv_lora_rank=32,
                        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32),
    "glm4_moe": SPARSE,
}
# The Linears each architecture has in its decoder blocks: what the default LoRA targets must be.
LINEARS = {
    "llama": "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    "qwen3": "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    "gemma2": "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    "gemma3_text": "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    "phi3": "down_proj, gate_up_proj, o_proj, qkv_proj",
    "starcoder2": "c_fc, c_proj, k_proj, o_proj, q_proj, v_proj",
    "gpt_oss": "k_proj, o_proj, q_proj, v_proj",
}


def build(kind: str, world, out):
    """A random-init model of `kind` with the world's tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    world_cfg = json.loads((world / "model" / "config.json").read_text())
    ids = {k: world_cfg[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    kw = {**COMMON, **ids, **ARCHS.get(kind, FAMILIES.get(kind, {}))}
    cfg = AutoConfig.for_model(kind, **{k: v for k, v in kw.items() if v is not None})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    for f in (world / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


def train(capsys, world, model, out, extra=(), *, base_overrides, recipe):
    argv = [*base_overrides(world, out), f"model.path={model}", "training.steps=2", "qat.enabled=true",
            "qat.scheme=8da4w", "lora.enabled=true", *extra]
    try:
        recipe("train").main(["--config", str(ROOT / "configs/tiny/full.yaml"), *argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def convert_and_evaluate(run, out, world, *, recipe):
    recipe("convert").main(["--checkpoint", str(run), "--out", str(out)])
    verify = json.loads((out / "verify.json").read_text())
    # lm-eval loads the folder itself: attention and experts must work there too (in-process, so
    # lm-eval is imported once per test session)
    res = recipe("evaluate").main(["--model", str(out / "quantized"), "--tasks", "local", "--data-dir",
                                str(world / "eval"), "--limit", "2", "--dtype", "float32"])
    assert 0 <= res["hellaswag"]["acc"] <= 1 and res["wikitext"]["word_perplexity"] > 1
    return verify


@pytest.mark.parametrize("kind", [k for k in ARCHS if k not in MOE_WORLD2])
def test_defaults_train_convert_evaluate(kind, world, tmp_path, capsys, base_overrides, recipe):
    model = build(kind, world, tmp_path / kind)
    capsys.readouterr()
    code, logs = train(capsys, world, model, tmp_path / "run", base_overrides=base_overrides, recipe=recipe)
    assert code == 0, logs.err[-3000:]
    assert f"lora: every Linear of the decoder blocks: {LINEARS[kind]}" in logs.out
    meta = json.loads((tmp_path / "run/checkpoints/step-000002/meta.json").read_text())
    cov = meta["qat_coverage"]
    assert f"QAT fake-quantizes {cov['fake_quantized_tensors']} of {cov['weight_tensors']}" in logs.out
    if kind == "gpt_oss":  # experts covered; the router [4, 64] (+ its bias, a vector) is not
        assert cov["expert_tensors"] == 4 and cov["router_high_precision"] == {"*.mlp.router.weight": [4, 64]}
        assert cov["unquantized"] == {} and cov["share"] == pytest.approx(1 - 2 * 4 * 64 / cov["parameters"])
    else:
        assert cov["share"] == 1.0 and cov["unquantized"] == {}
    verify = convert_and_evaluate(tmp_path / "run", tmp_path / "export", world, recipe=recipe)
    assert verify["qat_coverage"] == cov
    assert verify["converted_equals_fake_quant"] is True and verify["reload_equal"] is True
    if kind == "gpt_oss":  # x @ W[e] on a 3D quantized tensor does not run: simulated, labelled
        assert verify["experts"]["simulated"] == 4 and "x @ W[e]" in verify["experts"]["why_simulated"]
        assert "convert: 4 expert weight tensors are simulated" in capsys.readouterr().out


@pytest.mark.parametrize("kind", MOE_WORLD2)
def test_moe_experts_train_at_world_two_convert_evaluate(kind, world, tmp_path, capsys, base_overrides, run_train, recipe):
    """MoE: experts sharded on dim 0 by FSDP2 across 2 ranks, fake-quantized after a delay of one
    step; LoRA on attention; >= 95% of the decoder's weights covered (20% before experts were);
    convert turns the experts into torchao intx tensors that equal the fake-quantized forward."""
    model = build(kind, world, tmp_path / kind)
    proc = run_train([*base_overrides(world, tmp_path / "run"), f"model.path={model}", "training.steps=2",
                      "qat.enabled=true", "qat.scheme=8da4w", "qat.fake_quant_after_n_steps=1",
                      "lora.enabled=true"], nproc=2)
    assert "lora: every Linear of the decoder blocks: k_proj, o_proj, q_proj, v_proj" in proc.stdout
    meta = json.loads((tmp_path / "run/checkpoints/step-000002/meta.json").read_text())
    cov = meta["qat_coverage"]
    # per block: q,k,v,o Linears (64x64 x2, 32x64 x2) and the experts (4x128x64 + 4x64x64) are
    # covered; the router (4x64) stays high precision by rule
    linear, experts, router = 64 * 64 * 2 + 32 * 64 * 2, 4 * 128 * 64 + 4 * 64 * 64, 4 * 64
    assert cov["share"] == pytest.approx((linear + experts) / (linear + experts + router), abs=1e-12)
    assert cov["share"] > 0.95 and cov["unquantized"] == {} and cov["expert_tensors"] == 4
    assert "the router stays high precision by rule" in proc.stdout
    verify = convert_and_evaluate(tmp_path / "run", tmp_path / "export", world, recipe=recipe)
    assert verify["qat_coverage"] == cov
    assert verify["experts"]["real_quantized"] == 4 and verify["experts"]["simulated"] == 0
    assert verify["converted_equals_fake_quant"] is True and verify["reload_equal"] is True
    # the folder holds the experts as torchao tensors (int8 qdata + scales), not dequantized values
    from safetensors import safe_open

    with safe_open(str(tmp_path / "export/quantized/model.safetensors"), framework="pt") as f:
        qdata = {k: f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("_qdata") and ".experts." in k}
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"
    assert qdata == {f"model.layers.{i}.{block}.experts._{n}_qdata": "I8"
                     for i in range(2) for n in ("gate_up_proj", "down_proj")}
    assert json.loads((tmp_path / "export/quantized/config.json").read_text())["experts_implementation"] == "eager"


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_deepseek_v3_and_glm4_moe_train_convert_evaluate(kind, world, tmp_path, base_overrides, run_train, recipe):
    """Defaults at world size 2: QAT 8da4w (full fine-tuning, activation checkpointing) and LoRA +
    QAT each train 2 steps with all but the router fake-quantized, convert exactly, and the
    quantized folder evaluates; the adapter folder reloads (router and experts without adapters)."""
    model = build(kind, world, tmp_path / kind)
    # per model: 2 blocks of attention (MLA 14,336 / GQA 12,288), the dense MLP of block 0 (24,576),
    # the routed experts (4x64x64 + 4x64x32) and shared experts (3x32x64) of block 1, its router 4x64
    params = {"deepseek_v3": 2 * 14336, "glm4_moe": 2 * 12288}[kind] + 24576 + 24576 + 6144 + 256
    arms = {"qat": ["lora.enabled=false", "fsdp.activation_checkpointing=full"], "lora": ["lora.enabled=true"]}
    for arm, extra in arms.items():
        proc = run_train([*base_overrides(world, tmp_path / arm), f"model.path={model}", "training.steps=2",
                          "qat.enabled=true", "qat.scheme=8da4w", *extra], nproc=2)
        cov = json.loads((tmp_path / arm / "checkpoints/step-000002/meta.json").read_text())["qat_coverage"]
        assert cov["parameters"] == params and cov["share"] == 1 - 256 / params and cov["share"] >= 0.99
        assert cov["unquantized"] == {} and cov["expert_tensors"] == 2
        assert cov["router_high_precision"] == {"*.mlp.gate.weight": [4, 64]}
        assert "QAT fake-quantizes" in proc.stdout and "the router stays high precision by rule" in proc.stdout
        if arm == "qat":
            verify = convert_and_evaluate(tmp_path / arm, tmp_path / f"export-{arm}", world, recipe=recipe)
        else:
            attn = {"deepseek_v3": "kv_a_proj_with_mqa, kv_b_proj, o_proj, q_a_proj, q_b_proj",
                    "glm4_moe": "k_proj, o_proj, q_proj, v_proj"}[kind]
            names = ", ".join(sorted(["down_proj", "gate_proj", "up_proj", *attn.split(", ")]))
            assert f"lora: every Linear of the decoder blocks: {names}" in proc.stdout
            recipe("convert").main(["--checkpoint", str(tmp_path / arm), "--out", str(tmp_path / f"export-{arm}")])
            verify = json.loads((tmp_path / f"export-{arm}/verify.json").read_text())
        assert verify["qat_coverage"] == cov and verify["experts"]["real_quantized"] == 2
        assert verify["converted_equals_fake_quant"] is True and verify["reload_equal"] is True
    adapter_reloads(tmp_path / kind, tmp_path / "export-lora", world)


def adapter_reloads(base_dir, export, world):
    """PeftModel.from_pretrained(base, adapter/) equals hf/, inside targets_as_given: peft 0.21
    otherwise moves these model types' gate/up/down targets onto the fused experts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qat.model import targets_as_given

    x = torch.randint(3, 500, (2, 16))
    with targets_as_given():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), export / "adapter").eval()
    with torch.no_grad():
        got, want = adapted(x).logits, AutoModelForCausalLM.from_pretrained(export / "hf").eval()(x).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_moe_full_qat_resume_is_bitwise_with_the_delay_across_it(world, tmp_path, capsys, base_overrides, load_checkpoint_tensors, losses, read_metrics, recipe):
    """Experts trained (no LoRA) with fake quantization switched on at step 2: 3 steps straight
    equal 1 step + stop + resume, losses and every tensor of the final checkpoint."""
    model = build("qwen3_moe", world, tmp_path / "qwen3_moe")
    args = ["lora.enabled=false", "training.steps=3", "qat.fake_quant_after_n_steps=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    runs = [(straight, args), (split, args + ["training.stop_after_steps=1"]),
            (split, args + ["checkpoint.resume=auto"])]
    for out, extra in runs:
        code, logs = train(capsys, world, model, out, extra, base_overrides=base_overrides, recipe=recipe)
        assert code == 0, logs.err[-3000:]
    assert len(losses(straight)) == 3 and losses(split) == losses(straight)
    a, b = (load_checkpoint_tensors(r / "checkpoints/step-000003")["model"] for r in (straight, split))
    experts = [k for k in a if k.endswith("experts.gate_up_proj")]
    assert experts and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(model).state_dict()  # the file holds per-expert Linears
    assert all(not torch.equal(init[k], a[k]) for k in experts)  # the experts trained
    assert [m["qat/fake_quant_enabled"] for m in read_metrics(split)] == [0, 0, 1]


def test_uncovered_weights_are_refused_in_one_line(world, tmp_path, capsys, base_overrides, recipe):
    """GPT-2 keeps its projections in Conv1D, which no scheme covers."""
    model = build("gpt2", world, tmp_path / "gpt2")
    capsys.readouterr()
    code, logs = train(capsys, world, model, tmp_path / "run", ["lora.enabled=false"], base_overrides=base_overrides, recipe=recipe)
    err = [l for l in logs.err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(err) == 1, logs.err[-2000:]
    assert err[0].startswith("error: QAT would fake-quantize only 0.0% of the decoder's weight parameters: "
                             "no scheme covers *.attn.c_attn (Conv1D: weight [64, 192]); ")
    assert "qat.allow_unquantized=true" in err[0]


@pytest.mark.parametrize("impl, needle", [("foo", 'attn_implementation="foo"` is not supported'),
                                          ("flash_attention_2", "FlashAttention2 has been toggled on")])
def test_unusable_attention_implementation_is_one_line(world, tmp_path, capsys, impl, needle, base_overrides, recipe):
    # flash attention keeps packed documents apart at any batch size (varlen kwargs): what fails here is the import
    code, logs = train(capsys, world, world / "model", tmp_path, [f"model.attn_implementation={impl}",
                                                                  "training.batch_size=1"], base_overrides=base_overrides, recipe=recipe)
    err = logs.err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: model.attn_implementation='{impl}' does not work here: ")
    assert needle in err[-1] and "null lets transformers pick" in err[-1]
    assert [l for l in logs.err.splitlines() if l.startswith("error:")] == [err[-1]]
