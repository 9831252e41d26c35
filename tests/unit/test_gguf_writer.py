"""The GGUF writer: llama.cpp's tensor names, the architectures it writes, and its refusals."""

import pytest
import torch

gguf = pytest.importorskip("gguf")

from qat.convert.gguf_archs import gguf_name  # noqa: E402
from qat.convert.gguf_writer import write_gguf  # noqa: E402
from qat.errors import UserError  # noqa: E402
from qat.gguf_quant import GGUFWeight  # noqa: E402


def test_llama_cpp_names():
    assert gguf_name("model.layers.3.mlp.up_proj.weight") == "blk.3.ffn_up.weight"
    assert gguf_name("model.layers.0.self_attn.k_norm.weight") == "blk.0.attn_k_norm.weight"
    assert gguf_name("model.layers.1.self_attn.q_proj.bias") == "blk.1.attn_q.bias"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.layers.0.mlp.experts.gate_up_proj") is None
    # Gemma 3's four norms per block
    names = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm"}
    for hf, ours in names.items():
        assert gguf_name(f"model.layers.2.{hf}.weight", "gemma3_text") == f"blk.2.{ours}.weight"


def tiny(kind: str, tok, **gemma3):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "gemma3_text":
        kw = dict(common, head_dim=16, query_pre_attn_scalar=16, sliding_window=32) | gemma3
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw))
    if kind == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=1, n_head=4))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_files_hold_the_codes_and_their_own_tensors(arch, tok, tmp_path):
    model = tiny(arch, tok)
    targets = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    types = write_gguf(model, tok, tmp_path / "m.gguf", "q8_0", targets, "f16", "tiny")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == arch
    tensors = {t.name: t for t in r.tensors}
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    t = tensors["blk.0.ffn_down.weight"]
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(w.shape),
                       GGUFWeight("q8_0")(w)[0])
    assert types["token_embd.weight"] == "f16" and types["blk.0.attn_norm.weight"] == "f32"
    extra = {"qwen2": "blk.0.attn_q.bias", "qwen3": "blk.0.attn_q_norm.weight"}[arch]
    assert extra in tensors and types[extra] == "f32"
    assert sum(v == "q8_0" for v in types.values()) == 7


def test_unsupported_architecture_is_one_line(tok, tmp_path):
    with pytest.raises(UserError, match=r"^GGUF export supports the architectures llama, qwen2, qwen3, gemma2, "
                                        r"gemma3_text, starcoder2, mixtral, qwen3_moe; this model "
                                        r"is 'gpt2' \(convert without --gguf"):
        write_gguf(tiny("gpt2", tok), tok, tmp_path / "m.gguf", "q4_0", set(), "f16", "tiny")
    assert not (tmp_path / "m.gguf").exists()


def test_compare_rows_of_llama_cpp_bits_per_byte():
    from qat.eval.gguf_eval import markdown

    md = markdown({"bf16": {"bits_per_byte": 1.0}, "ptq": {"bits_per_byte": 1.5}, "qat": {"bits_per_byte": 1.1}},
                  "q4_0", "f16", "heldout.jsonl")
    assert md.splitlines()[-3:] == ["| bf16 (GGUF f16) | 1.0000 |  |", "| PTQ | 1.5000 |  |", "| QAT | 1.1000 | 80% |"]


def test_a_tokenizer_llama_cpp_cannot_name_is_one_line(tok):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qat.convert.gguf_writer import pre_tokenizer_name

    assert pre_tokenizer_name(tok) == "gpt-2"
    word = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(UserError, match=r"^GGUF export supports byte-level BPE tokenizers; this one is 'WordLevel'$"):
        pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=word))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(UserError, match="not one llama.cpp knows by name"):
        pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=bpe))


def test_gemma3_norms_are_stored_as_llama_cpp_multiplies_them(tok, tmp_path):
    """Gemma's RMSNorm scales by (1 + w); llama.cpp's by the stored weight: the file holds 1 + w."""
    model = tiny("gemma3_text", tok)
    with torch.no_grad():
        model.model.layers[0].post_feedforward_layernorm.weight.normal_()
    types = write_gguf(model, tok, tmp_path / "m.gguf", None, set(), "f32", "tiny")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "gemma3"
    assert int(r.fields["gemma3.attention.sliding_window"].parts[-1][0]) == 32
    tensors = {t.name: t for t in r.tensors}
    w = model.model.layers[0].post_feedforward_layernorm.weight.detach()
    assert torch.equal(torch.from_numpy(tensors["blk.0.post_ffw_norm.weight"].data.copy()), w + 1)
    assert "output.weight" not in types  # tied to token_embd, as llama.cpp reads it


@pytest.mark.parametrize("change, why", [
    (dict(query_pre_attn_scalar=64), r"scales attention by 1/sqrt\(16\), this config by 1/sqrt\(64\)"),
    (dict(final_logit_softcapping=30.0), "applies no logit softcapping"),
    (dict(layer_types=["full_attention"]), "makes every 6th layer global"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 5e4},
                           "full_attention": {"rope_type": "default", "rope_theta": 1e6}}), "base 10000"),
])
def test_a_gemma3_config_llama_cpp_would_run_differently_is_one_line(change, why, tok, tmp_path):
    with pytest.raises(UserError, match=f"^GGUF export: llama.cpp's gemma3 .*{why}.*; llama.cpp would compute "
                                        "another model"):
        write_gguf(tiny("gemma3_text", tok, **change), tok, tmp_path / "m.gguf", "q8_0", set(), "f32", "tiny")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("kind, change, why", [
    ("qwen3_moe", dict(norm_topk_prob=False), "renormalizes the top-k router weights; this config has norm_topk_prob"),
    ("qwen3_moe", dict(norm_topk_prob=True, mlp_only_layers=[0]), "has experts in every block"),
    ("mixtral", dict(sliding_window=32), "without a sliding window; this config slides over 32"),
    ("starcoder2", dict(sliding_window=32), "without a sliding window; this config slides over 32"),
    ("gemma2", dict(final_logit_softcapping=None), "always softcaps the attention and final logits"),
    ("gemma2", dict(layer_types=["full_attention"]), "makes every 2nd layer global"),
])
def test_a_config_llama_cpp_would_run_differently_is_one_line(kind, change, why, tok, tmp_path):
    import transformers

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    own = {"qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
           "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
           "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32)}.get(kind, {})
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        kind, **common, **own, **change))
    with pytest.raises(UserError, match=f"^GGUF export: llama.cpp.*{why}.*; llama.cpp would compute another model "
                                        "\\(convert without --gguf\\)$"):
        write_gguf(model, tok, tmp_path / "m.gguf", "q4_0", set(), "f32", "tiny")
    assert not (tmp_path / "m.gguf").exists()
