"""MoE experts: fused 3D expert weights get each scheme's fake quantization (per expert, along the
reduction dimension, clipped straight-through gradient, whatever the expert forward does inside),
and convert turns them into torchao intx tensors whose forward equals the fake-quantized one."""

import copy

import pytest
import torch
import torch.nn as nn

from qat import moe
from qat.config import FakeQuantConfig
from qat.coverage import coverage
from qat.fake_quant import IntxWeight
from qat.layout import decoder_blocks, expert_weight_names, experts_modules, is_experts
from qat.model import apply_qat, set_fake_quant
from qat.convert.experts import quantize_experts
from qat.schemes import get_scheme

MOE = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=128),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, layer_types=None),
}


def tiny(kind, layers=1):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, hidden_size=64, num_hidden_layers=layers, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=32, vocab_size=96, max_position_embeddings=64,
                               **{k: v for k, v in MOE[kind].items() if v is not None})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def qat(model, scheme="8da4w", group_size=32):
    apply_qat(model, FakeQuantConfig(enabled=True, scheme=scheme, group_size=group_size), get_scheme(scheme))
    return model


def reference(kind, fq, scheme="8da4w"):
    """QAT on the Linears, and each expert's [out, in] matrix fake-quantized by the 2D quantizer
    one expert at a time, in the model's own (unwrapped) experts module."""
    ref = qat(tiny(kind), scheme)
    rex = next(iter(experts_modules(decoder_blocks(ref)).values()))
    moe.unwrap(rex)
    masks = {}
    for n in expert_weight_names(rex):
        w = rex._parameters[n].detach()
        t = rex.is_transposed
        pairs = [fq((w[e].t() if t else w[e]).contiguous()) for e in range(w.shape[0])]
        wq = torch.stack([q.t() if t else q for q, _ in pairs])
        masks[n] = torch.stack([m.t() if t else m for _, m in pairs]) if pairs[0][1] is not None else None
        rex._parameters[n] = nn.Parameter(wq)
    return ref, rex, masks


@pytest.mark.parametrize("kind", list(MOE))
def test_expert_fake_quant_equals_a_per_expert_reference(kind):
    """The experts' forward under QAT equals the model's own forward on weights that the 2D fake
    quantizer gave expert by expert, groups along what each expert's matmul contracts over
    (dim 2, or dim 1 for gpt-oss's x @ W[e])."""
    model = qat(tiny(kind))
    ex = next(iter(experts_modules(decoder_blocks(model)).values()))
    assert isinstance(ex, moe.QATExperts) and ex.is_transposed is (kind == "gpt_oss")
    ref, _, _ = reference(kind, IntxWeight(4, 32))
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        got, want = model(x).logits, ref(x).logits
        assert torch.equal(got, want)
        assert not torch.equal(got, unfake_logits(model, x))
    cov = coverage(model)
    assert cov["expert_tensors"] == 2 and cov["unquantized"] == {}
    assert list(cov["router_high_precision"]) == [f"*.mlp.{'router' if kind == 'gpt_oss' else 'gate'}.weight"]
    # attention 64*64 + 32*64 + 32*64 + 64*64 and experts 4*128*64 + 4*64*64 fake-quantized; the
    # router's 4*64 stays high precision
    assert (cov["fake_quantized_parameters"], cov["parameters"]) == (61440, 61696)
    assert cov["share"] == 61440 / 61696


def unfake_logits(model, x):
    from qat.convert.transforms import unfake

    return unfake(model)(x).logits


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_expert_gradient_is_the_clipped_straight_through_one(kind):
    """d loss / d W equals the gradient through a per-expert reference times its unclipped mask.
    Symmetric int4 clips each group's largest positive value (absmax / scale = 7.5 rounds to 8 > 7),
    so the mask is not all ones."""
    model = qat(tiny(kind), "intx4-weight-only", 32)
    ex = next(iter(experts_modules(decoder_blocks(model)).values()))
    ref, rex, masks = reference(kind, IntxWeight(4, 32), "intx4-weight-only")
    x = torch.randint(0, 96, (2, 12))
    model(x).logits.square().mean().backward()
    ref(x).logits.square().mean().backward()
    for n in expert_weight_names(ex):
        assert (masks[n] == 0).any()
        assert torch.equal(getattr(ex, n).grad, rex._parameters[n].grad * masks[n])


def test_fake_quantized_expert_weights_are_recomputed_not_saved(monkeypatch):
    """Lean memory: every tensor the expert forward saves from the fake-quantized weights' storage
    is stored as a recipe, recomputed once per weight in backward, with the same gradients as
    when they are saved (an outer hook, such as activation checkpointing's, makes the hook step aside)."""
    x = torch.randint(0, 96, (2, 12))
    grads, recipes, counts = [], [], []
    pack = moe._Recompute.pack

    def spy(self, t):
        out = pack(self, t)
        if isinstance(out, tuple):
            recipes.append(self)
        return out

    monkeypatch.setattr(moe._Recompute, "pack", spy)
    for outer in (False, True):
        model = qat(tiny("qwen3_moe"))
        ex = next(iter(experts_modules(decoder_blocks(model)).values()))
        if outer:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                loss = model(x).logits.square().mean()
        else:
            loss = model(x).logits.square().mean()
        loss.backward()
        grads.append([getattr(ex, n).grad for n in expert_weight_names(ex)])
        counts.append(len(recipes))
    # one recipe per expert weight (gate_up_proj, down_proj), from one hook; none under an outer hook
    assert counts == [2, 2] and {id(r) for r in recipes} == {id(recipes[0])}
    assert sorted(recipes[0].cache) == ["down_proj", "gate_up_proj"]  # recomputed once each
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_delay_switch_and_frozen_experts():
    model = qat(tiny("mixtral"))
    x = torch.randint(0, 96, (2, 12))
    plain = tiny("mixtral")
    set_fake_quant(model, False)
    assert torch.equal(model(x).logits, plain(x).logits)
    set_fake_quant(model, True)
    on = model(x).logits
    assert not torch.equal(on, plain(x).logits)
    for p in model.parameters():  # frozen experts (LoRA): still fake-quantized, no gradient asked
        p.requires_grad_(False)
    frozen = model(x).logits
    assert torch.equal(frozen, on) and frozen.grad_fn is None


@pytest.mark.parametrize("scheme", ["8da4w", "intx2-weight-only"])
def test_converted_experts_equal_fake_quant_and_reload_from_the_folder(scheme, tmp_path):
    """Real IntxUnpackedToInt8Tensor expert weights, run by the model's eager expert forward, give
    exactly the fake-quantized logits; the quantized folder stores them as int8 qdata + scales and
    from_pretrained rebuilds the same tensors (eager experts from config.json), same logits."""
    from types import SimpleNamespace

    from safetensors import safe_open
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from transformers import AutoModelForCausalLM

    from qat.convert.transforms import qat_convert, quantized_config, save_quantized, unfake

    model = qat(tiny("qwen3_moe", layers=2), scheme)
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        fake = model(x).logits
        conv = qat_convert(copy.deepcopy(model), get_scheme(scheme), 32, None)
        rec = quantize_experts(conv, get_scheme(scheme), 32)
        assert rec["real_quantized"] == 4 and rec["simulated"] == 0
        ex = next(iter(experts_modules(decoder_blocks(conv)).values()))
        assert isinstance(ex.gate_up_proj.data, IntxUnpackedToInt8Tensor) and not isinstance(ex, moe.QATExperts)
        assert torch.equal(conv(x).logits, fake)
        plain = unfake(model)
        assert not torch.equal(plain(x).logits, fake)
    save_quantized(conv, SimpleNamespace(save_pretrained=lambda folder: None), tmp_path,
                   quantized_config(conv, get_scheme(scheme), 32, None))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        qdata = f.get_tensor("model.layers.1.mlp.experts._gate_up_proj_qdata")
        scale = f.get_tensor("model.layers.1.mlp.experts._gate_up_proj_scale")
    assert qdata.dtype == torch.int8 and qdata.shape == (4, 128, 64) and scale.shape == (4, 128, 2)
    bits = {"8da4w": 4, "intx2-weight-only": 2}[scheme]
    # intN values in int8, spanning the whole signed N-bit range
    assert (int(qdata.min()), int(qdata.max())) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert torch.equal(qdata, conv.model.layers[1].mlp.experts.gate_up_proj.qdata)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    rex = back.model.layers[1].mlp.experts
    assert back.config._experts_implementation == "eager"
    assert isinstance(rex.gate_up_proj, IntxUnpackedToInt8Tensor) and isinstance(rex.down_proj, IntxUnpackedToInt8Tensor)
    with torch.no_grad():
        assert torch.equal(back(x).logits, fake)
        # a process without our select (plain `lm_eval` CLI) fails in the eager expert forward
        table = IntxUnpackedToInt8Tensor._ATEN_OP_TABLE[IntxUnpackedToInt8Tensor]
        select = table.pop(torch.ops.aten.select.int)
        try:
            with pytest.raises(NotImplementedError, match="aten.select"):
                back(x)
        finally:
            table[torch.ops.aten.select.int] = select


def test_transposed_experts_convert_simulated(capsys):
    model = qat(tiny("gpt_oss"))
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        fake = model(x).logits
        from qat.convert.transforms import qat_convert
        conv = qat_convert(copy.deepcopy(model), get_scheme("8da4w"), 32, None)
        rec = quantize_experts(conv, get_scheme("8da4w"), 32)
    assert rec["simulated"] == 2 and rec["real_quantized"] == 0 and "x @ W[e]" in rec["why_simulated"]
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("convert: ")]
    assert len(line) == 1 and "simulated" in line[0]
    with torch.no_grad():
        assert torch.equal(conv(x).logits, fake)


def test_group_size_must_divide_the_experts_reduction_dim():
    from qat.errors import UserError

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=32, vocab_size=96, num_local_experts=4,
                               intermediate_size=48)
    with pytest.raises(UserError, match=r"qat.group_size=32 does not divide the reduction dimension 48 of "
                                        r"expert weight 0.mlp.experts.down_proj"):
        qat(AutoModelForCausalLM.from_config(cfg))


def test_report_header_coverage_line(tmp_path):
    from qat.coverage import header_line

    assert header_line(tmp_path / "missing.json") is None
    cov = {"share": 0.99585, "weight_tensors": 12, "fake_quantized_tensors": 10, "unquantized": {},
           "expert_tensors": 4, "router_high_precision": {"*.mlp.gate.weight": [4, 64]}}
    (tmp_path / "verify.json").write_text(__import__("json").dumps({"qat_coverage": cov}))
    # rounded down, never up: 99.585% is not yet 99.6%
    assert header_line(tmp_path / "verify.json") == ("99.5% of the decoder blocks' weight parameters quantized "
                                                     "(10 of 12 tensors); MoE experts weight-only; router high precision")


def test_ptq_quantizes_experts_like_qat_convert():
    """A bf16 run's PTQ: the same real intx experts, equal to the fake-quantized forward of the plain model."""
    from qat.convert.transforms import ptq

    plain = tiny("qwen3_moe")
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        fake = qat(copy.deepcopy(plain), "intx4-weight-only")(x).logits
        q = ptq(plain, get_scheme("intx4-weight-only"), 32)
        assert quantize_experts(q, get_scheme("intx4-weight-only"), 32)["real_quantized"] == 2
        assert torch.equal(q(x).logits, fake)


def test_experts_of_an_undeclared_layout_are_refused_unless_allowed():
    """Without transformers' `is_transposed` flag the reduction dimension is unknown: the experts
    are left out, named with their module in the one-line refusal, and stay high precision with
    allow_unquantized."""
    from qat.errors import UserError

    model = tiny("qwen3_moe")
    ex = next(m for m in model.modules() if is_experts(m))
    del ex.is_transposed
    # attention 12,288 of 61,696 parameters (experts 49,152, router 256): 19.917%, rounded down
    with pytest.raises(UserError, match=r"only 19\.9% of the decoder's weight parameters: no scheme covers "
                                        r"\*\.mlp\.experts \(Qwen3MoeExperts fused experts without a declared layout: "
                                        r"gate_up_proj \[4, 128, 64\], down_proj \[4, 64, 64\]\)\. Set"):
        qat(model)
    apply_qat(model, FakeQuantConfig(enabled=True, allow_unquantized=True), get_scheme("8da4w"))
    cov = coverage(model)
    assert not isinstance(ex, moe.QATExperts) and list(cov["unquantized"]) == ["*.mlp.experts.gate_up_proj",
                                                                             "*.mlp.experts.down_proj"]


# --- recognition by layout: DeepSeek-V3 / GLM-4.5 and the other families ---------------------------------

# Two blocks, the first dense (first_k_dense_replace); hidden 64 and every in_features a multiple of 32.
SPARSE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128,
              first_k_dense_replace=1, n_group=1, topk_group=1, n_shared_experts=1)
FAMILIES = {
    # MLA: q_a_proj 64->32, q_b_proj 32->64, kv_a_proj_with_mqa 64->48, kv_b_proj 32->96, o_proj 64->64
    "deepseek_v3": dict(SPARSE, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=32),
    "glm4_moe": dict(SPARSE, num_key_value_heads=1, head_dim=32),
}


def tiny_family(kind):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=96,
                               max_position_embeddings=64, **FAMILIES[kind])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_deepseek_v3_and_glm4_moe_routers_experts_and_shared_experts(kind):
    """The router is the module with a bare [E, H] weight (and a score-correction bias) next to the
    experts, whatever its class: it stays high precision; the fused experts, the shared experts,
    the dense first block's MLP and the MLA projections are all fake-quantized."""
    from qat.layout import routers
    from qat.model import qat_targets

    model = tiny_family(kind)
    blocks = decoder_blocks(model)
    gate = blocks[1].mlp.gate
    assert not isinstance(gate, nn.Linear) and routers(blocks) == {"1.mlp.gate": gate}
    assert list(experts_modules(blocks)) == ["1.mlp.experts"]
    attn = {"deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
            "glm4_moe": ["q_proj", "k_proj", "v_proj", "o_proj"]}[kind]
    mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    shared = ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"]
    want = [f"model.layers.0.{n}" for n in [f"self_attn.{a}" for a in attn] + mlp] + \
           [f"model.layers.1.{n}" for n in [f"self_attn.{a}" for a in attn] + shared]
    assert sorted(qat_targets(model)) == sorted(want)
    cov = coverage(qat(model))
    assert isinstance(blocks[1].mlp.experts, moe.QATExperts)
    assert cov["unquantized"] == {} and cov["expert_tensors"] == 2
    assert cov["router_high_precision"] == {"*.mlp.gate.weight": [4, 64]}
    assert cov["fake_quantized_tensors"] == cov["weight_tensors"] - 1
    assert cov["share"] == 1 - 4 * 64 / cov["parameters"] and cov["share"] >= 0.99
    x = torch.randint(0, 96, (2, 12))
    model(x).logits.square().mean().backward()
    assert blocks[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0 and gate.weight.grad is not None


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_lora_targets_the_linears_not_the_fused_experts(kind):
    """peft 0.21 would move gate_proj/up_proj/down_proj targets onto the fused experts of these model
    types (its transformers v4 -> v5 rewrite): LoRA stays on the Linears, shared experts included,
    and the experts keep their 3D parameters for expert QAT."""
    from qat.config import LoRAConfig
    from qat.model import apply_lora

    model = apply_lora(tiny_family(kind), LoRAConfig(enabled=True))
    assert not model.peft_config["default"].target_parameters
    blocks = decoder_blocks(model)
    assert type(blocks[1].mlp.experts).__name__.endswith("Experts")
    assert expert_weight_names(blocks[1].mlp.experts) == ["gate_up_proj", "down_proj"]
    for lin in (blocks[1].mlp.shared_experts.gate_proj, blocks[0].mlp.down_proj):
        assert "default" in lin.lora_A
    assert not hasattr(blocks[1].mlp.gate, "lora_A")
    cov = coverage(qat(model))
    assert cov["expert_tensors"] == 2 and cov["unquantized"] == {}


def test_qwen2_moe_shared_expert_gate_stays_high_precision_and_gets_no_adapter():
    """Qwen2-MoE: the router (bare [E, H] weight) and the shared-expert gate ([1, H], an nn.Linear)
    stay high precision; the shared expert's Linears follow the scheme. LoRA's default targets
    leave both gates out, and a router that subclasses nn.Linear (Phi-3.5-MoE) too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.config import LoRAConfig
    from qat.model import apply_lora, block_linear_targets

    cfg = AutoConfig.for_model("qwen2_moe", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=96, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=32, shared_expert_intermediate_size=64)
    model = AutoModelForCausalLM.from_config(cfg)
    _, names = block_linear_targets(model)
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    model = apply_lora(model, LoRAConfig(enabled=True))
    cov = coverage(qat(model))
    assert cov["router_high_precision"] == {"*.mlp.gate.weight": [4, 64], "*.mlp.shared_expert_gate.weight": [1, 64]}
    mlp = decoder_blocks(model)[0].mlp
    assert type(mlp.shared_expert_gate) is nn.Linear and "default" in mlp.shared_expert.up_proj.lora_A
    assert cov["unquantized"] == {} and cov["expert_tensors"] == 2

    phimoe = AutoConfig.for_model("phimoe", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=96, num_local_experts=4, intermediate_size=64)
    model = AutoModelForCausalLM.from_config(phimoe)
    _, names = block_linear_targets(model)
    assert "router" not in names
    model = apply_lora(model, LoRAConfig(enabled=True))
    qat(model)(torch.randint(0, 96, (2, 12)))


class _MLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class _MoEGate(nn.Module):
    """The remote-code DeepSeek-V3 gate: a bare [E, H] weight and an [E] score-correction bias."""

    def __init__(self, experts, hidden):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(experts))


class _Block(nn.Module):
    def __init__(self, linear_gate):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.experts = nn.ModuleList(_MLP(64, 32) for _ in range(4))
        self.mlp.gate = nn.Linear(64, 4, bias=False) if linear_gate else _MoEGate(4, 64)
        self.mlp.shared_experts = _MLP(64, 32)
        self.attn = nn.Module()
        self.attn.gate = nn.Linear(64, 64, bias=False)  # an attention output gate: not a router


class _Model(nn.Module):
    _no_split_modules = ["_Block"]

    def __init__(self, linear_gate=False):
        super().__init__()
        self.layers = nn.ModuleList(_Block(linear_gate) for _ in range(2))
        self.embed = nn.Embedding(96, 64)

    def get_input_embeddings(self):
        return self.embed


def test_a_list_of_mlp_experts_and_a_bare_weight_router():
    """Remote-code DeepSeek-V3 layout: experts as a ModuleList of MLPs (plain Linears, QATLinear),
    a gate holding a bare [E, H] parameter and an [E] score-correction bias parameter."""
    from qat.fake_quant import QATLinear
    from qat.layout import is_expert_list, routers

    model = _Model()
    blocks = decoder_blocks(model)
    assert is_expert_list(blocks[0].mlp.experts)
    assert sorted(routers(blocks)) == ["0.mlp.gate", "1.mlp.gate"]
    cov = coverage(qat(model))
    assert isinstance(blocks[1].mlp.experts[3].down_proj, QATLinear)
    assert isinstance(blocks[1].mlp.shared_experts.up_proj, QATLinear) and isinstance(blocks[0].attn.gate, QATLinear)
    assert cov["router_high_precision"] == {"*.mlp.gate.weight": [4, 64]} and cov["unquantized"] == {}
    assert cov["share"] == 1 - 4 * 64 / (4 * 64 + 5 * 3 * 64 * 32 + 64 * 64)


def test_lora_default_targets_skip_a_linear_router_that_shares_its_name():
    """A router that is an nn.Linear called `gate`, next to an attention Linear also called `gate`:
    the default target regex matches the attention's and not the router's."""
    import re

    from qat.model import block_linear_targets

    pattern, names = block_linear_targets(_Model(linear_gate=True))
    assert names == ["down_proj", "gate", "gate_proj", "up_proj"]
    hits = {n for n in ("layers.1.attn.gate", "layers.1.mlp.gate", "layers.0.mlp.experts.2.up_proj",
                        "layers.0.mlp.shared_experts.down_proj") if re.fullmatch(pattern, n)}
    assert hits == {"layers.1.attn.gate", "layers.0.mlp.experts.2.up_proj", "layers.0.mlp.shared_experts.down_proj"}


def test_fused_experts_without_a_declared_layout_are_refused_naming_the_module():
    """JetMoE's JetMoeParallelExperts hold [E, out, in] weights without transformers' declaration;
    the refusal names each module once (not once per block), and its router is still the router."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.errors import UserError

    cfg = AutoConfig.for_model("jetmoe", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, kv_channels=32, vocab_size=96, num_local_experts=4,
                               num_experts_per_tok=2, intermediate_size=64)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UserError) as err:
        qat(model)
    msg = str(err.value)
    assert msg.startswith("QAT would fake-quantize only 9.0% of the decoder's weight parameters: no scheme covers ")
    assert "*.mlp.input_linear (JetMoeParallelExperts fused experts without a declared layout: weight [4, 128, 64]); " in msg
    assert msg.count("*.mlp.input_linear") == 1 and "router" not in msg and "\n" not in msg
