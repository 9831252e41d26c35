"""The defaults work on any HF causal LM: tiny random configs of several architectures go through
train (QAT 8da4w + LoRA, default targets and attention) and convert (Gemma 2 also through
evaluate); MoE experts are refused in
one line unless qat.allow_unquantized=true."""

import json
import shutil
import sys

import pytest

from conftest import ROOT, base_overrides

sys.path.insert(0, str(ROOT / "recipes"))
import convert as convert_recipe  # noqa: E402
import evaluate as evaluate_recipe  # noqa: E402
import train as train_recipe  # noqa: E402

# Dimensions are multiples of 32 so that group size 32 divides every in_features.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, max_position_embeddings=512, tie_word_embeddings=False)
ARCHS = {
    "llama": {},
    "qwen3": {},
    "gemma2": dict(query_pre_attn_scalar=32, sliding_window=32),
    "gemma3_text": dict(query_pre_attn_scalar=32, sliding_window=32),
    "phi3": dict(head_dim=None),  # phi3 derives head_dim; it fuses qkv_proj and gate_up_proj
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1),
}
# The Linears each architecture has in its decoder blocks: what the default LoRA targets must be.
LINEARS = {
    "llama": "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    "qwen3": "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    "gemma2": "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    "gemma3_text": "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    "phi3": "down_proj, gate_up_proj, o_proj, qkv_proj",
    "qwen3_moe": "k_proj, o_proj, q_proj, v_proj",
}


def build(kind: str, world, out):
    """A random-init model of `kind` with the world's tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    world_cfg = json.loads((world / "model" / "config.json").read_text())
    ids = {k: world_cfg[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    kw = {**COMMON, **ids, **ARCHS[kind]}
    cfg = AutoConfig.for_model(kind, **{k: v for k, v in kw.items() if v is not None})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    for f in (world / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


def train(capsys, world, model, out, extra=()):
    argv = [*base_overrides(world, out), f"model.path={model}", "training.steps=2", "qat.enabled=true",
            "qat.scheme=8da4w", "lora.enabled=true", *extra]
    try:
        train_recipe.main(["--config", str(ROOT / "configs/tiny/full.yaml"), *argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


@pytest.mark.parametrize("kind", list(ARCHS))
def test_defaults_train_and_convert(kind, world, tmp_path, capsys):
    model = build(kind, world, tmp_path / kind)
    capsys.readouterr()
    code, logs = train(capsys, world, model, tmp_path / "run")
    assert f"lora: every Linear of the decoder blocks: {LINEARS[kind]}" in logs.out
    extra = []
    if kind == "qwen3_moe":  # experts are fused 3D parameters: refused in one line, naming them
        assert code == 2
        err = [l for l in logs.err.splitlines() if l.startswith("error:")]
        assert len(err) == 1 and err[0].startswith("error: QAT would fake-quantize only "), logs.err
        assert "only 20% of the decoder's weight parameters: " in err[0]
        for name in ("*.mlp.gate.weight [4, 64]", "*.mlp.experts.gate_up_proj [4, 128, 64]",
                     "*.mlp.experts.down_proj [4, 64, 64]"):
            assert name in err[0].split(" are not nn.Linear")[0]
        assert "qat.allow_unquantized=true" in err[0]
        extra = ["qat.allow_unquantized=true"]
        code, logs = train(capsys, world, model, tmp_path / "run", extra)
    assert code == 0, logs.err[-3000:]
    meta = json.loads((tmp_path / "run/checkpoints/step-000002/meta.json").read_text())
    cov = meta["qat_coverage"]
    assert f"QAT fake-quantizes {cov['fake_quantized_tensors']} of {cov['weight_tensors']}" in logs.out
    if kind == "qwen3_moe":
        # per block: the q,k,v,o Linears are covered; the experts (4x128x64 + 4x64x64) and the
        # router (a 4x64 parameter, not a Linear) are not: 20%, as measured in transformers 5
        linear, experts, router = 64 * 64 * 2 + 32 * 64 * 2, 4 * 128 * 64 + 4 * 64 * 64, 4 * 64
        assert cov["share"] == pytest.approx(linear / (linear + experts + router), abs=1e-12)
        assert cov["unquantized"] == {"*.mlp.gate.weight": [4, 64], "*.mlp.experts.gate_up_proj": [4, 128, 64],
                                      "*.mlp.experts.down_proj": [4, 64, 64]}
        assert "left in high precision (qat.allow_unquantized)" in logs.out
    else:
        assert cov["share"] == 1.0 and cov["unquantized"] == {}
    out = tmp_path / "export"
    convert_recipe.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    verify = json.loads((out / "verify.json").read_text())
    assert verify["qat_coverage"] == cov
    assert verify["converted_equals_fake_quant"] is True and verify["reload_equal"] is True
    if kind == "gemma2":  # lm-eval loads the folder itself: the attention choice must hold there too
        res = evaluate_recipe.main(["--model", str(out / "quantized"), "--tasks", "local", "--data-dir",
                                    str(world / "eval"), "--limit", "4", "--dtype", "float32"])
        assert 0 <= res["hellaswag"]["acc"] <= 1 and res["wikitext"]["word_perplexity"] > 1


@pytest.mark.parametrize("impl, needle", [("foo", 'attn_implementation="foo"` is not supported'),
                                          ("flash_attention_2", "FlashAttention2 has been toggled on")])
def test_unusable_attention_implementation_is_one_line(world, tmp_path, capsys, impl, needle):
    # flash attention keeps packed documents apart at any batch size (varlen kwargs): what fails here is the import
    code, logs = train(capsys, world, world / "model", tmp_path, [f"model.attn_implementation={impl}",
                                                                  "training.batch_size=1"])
    err = logs.err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: model.attn_implementation='{impl}' does not work here: ")
    assert needle in err[-1] and "null lets transformers pick" in err[-1]
    assert [l for l in logs.err.splitlines() if l.startswith("error:")] == [err[-1]]
