"""Scheme registry, and QAT prepare/convert against torchao PTQ for the intx schemes."""

import copy

import pytest
import torch

from qat.config import FakeQuantConfig, LoRAConfig, ModelConfig
from qat.errors import UserError
from qat.model import apply_lora, apply_qat, load_model, qat_targets
from qat.schemes import SCHEMES, get_scheme


def test_registry_has_required_schemes():
    for name in ["8da4w", "int4-weight-only", "fp8-int4", "float8", "nvfp4", "mxfp4"] + [f"8da{b}w" for b in range(2, 9)] \
            + [f"intx{b}-weight-only" for b in range(2, 9)]:
        assert name in SCHEMES


def test_unknown_scheme_suggests_the_closest():
    with pytest.raises(UserError, match="unknown QAT scheme '8da4'. Did you mean '8da4w'"):
        get_scheme("8da4")


@pytest.mark.parametrize("name, needle", [("float8", "float8 support"), ("nvfp4", "Blackwell")])
def test_gpu_only_schemes_name_their_hardware(name, needle):
    with pytest.raises(UserError, match=needle):
        get_scheme(name).check_hardware(torch.device("cpu"))


@pytest.fixture(scope="module")
def base(world):
    return load_model(ModelConfig(path=str(world / "model")))


def probe(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", ["qatlinear", "torchao"])
@pytest.mark.parametrize("name, group", [("8da4w", 32), ("intx4-weight-only", 32), ("8da2w", 32),
                                         ("intx3-weight-only", None), ("8da8w", 64)])
def test_qat_convert_equals_torchao_ptq_exactly(base, name, group, backend):
    """prepare -> convert gives bit-identical outputs to quantize_(base_config), for both backends."""
    from torchao.quantization import quantize_

    from qat.convert.transforms import qat_convert

    scheme = get_scheme(name)
    x = probe(base.config.vocab_size)
    qat_model = copy.deepcopy(base)
    apply_qat(qat_model, FakeQuantConfig(enabled=True, scheme=name, group_size=group, backend=backend), scheme)
    with torch.no_grad():
        fake = qat_model(x).logits
    qat_convert(qat_model, scheme, group, embedding=None)
    ptq = copy.deepcopy(base)
    targets = set(qat_targets(ptq))
    quantize_(ptq, scheme.base_config(group), filter_fn=lambda m, fqn: fqn in targets)
    with torch.no_grad():
        converted, ptq_out = qat_model(x).logits, ptq(x).logits
    assert torch.equal(converted, ptq_out)
    # the fake-quantized training forward is what the deployed model computes
    assert torch.equal(fake, converted)


def test_fake_quant_changes_the_output_and_can_be_disabled(base):
    from qat.model import set_fake_quant

    m = copy.deepcopy(base)
    apply_qat(m, FakeQuantConfig(enabled=True, scheme="8da2w", group_size=32), get_scheme("8da2w"))
    x = probe(base.config.vocab_size)
    with torch.no_grad():
        ref, on = base(x).logits, m(x).logits
        set_fake_quant(m, False)
        off = m(x).logits
    assert torch.equal(off, ref)
    # int2 weights on every decoder Linear of the tiny world (seed 0): L2 error 0.7442 of the logits,
    # measured in fp32 on CPU; 1e-4 leaves room for a BLAS summation order, a layer left out moves it more
    assert float((on - ref).norm() / ref.norm()) == pytest.approx(0.74419, abs=1e-4)


def test_qat_with_lora_wraps_only_frozen_base_layers(base):
    torch.manual_seed(0)
    m = apply_lora(copy.deepcopy(base), LoRAConfig(enabled=True, rank=4))
    apply_qat(m, FakeQuantConfig(enabled=True, scheme="8da4w", group_size=32), get_scheme("8da4w"))
    from qat.fake_quant import QATLinear

    fq = [n for n, mod in m.named_modules() if isinstance(mod, QATLinear)]
    assert fq and all(n.endswith("base_layer") for n in fq)
    assert len(fq) == 7 * base.config.num_hidden_layers
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(fq) and all("lora_" in n for n in trainable)  # A and B of each


def test_group_size_that_does_not_divide_names_the_layer(base):
    m = copy.deepcopy(base)
    with pytest.raises(UserError, match=r"qat.group_size=48 does not divide in_features=128 of layer "
                                        r"model.layers.0.self_attn.q_proj"):
        apply_qat(m, FakeQuantConfig(enabled=True, scheme="8da4w", group_size=48), get_scheme("8da4w"))


def test_embedding_fake_quant_has_its_own_bits_and_converts_exactly(base):
    """The ExecuTorch recipe: 8da2w decoder Linears, int8 embedding (qat.embedding_bits=8)."""
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding

    from qat.convert.transforms import qat_convert, quantized_config
    from qat.schemes import EmbeddingQuant

    m = copy.deepcopy(base)
    cfg = FakeQuantConfig(enabled=True, scheme="8da2w", group_size=32, embedding=True, embedding_bits=8,
                          embedding_group_size=64)
    apply_qat(m, cfg, get_scheme("8da2w"))
    assert isinstance(m.get_input_embeddings(), FakeQuantizedEmbedding)
    assert m.get_input_embeddings().weight_fake_quantizer.config.dtype == torch.int8
    assert type(m.get_output_embeddings()) is torch.nn.Linear  # lm_head is never fake-quantized
    x = probe(base.config.vocab_size)
    with torch.no_grad():
        fake = m(x).logits
    emb = EmbeddingQuant(8, 64)
    qat_convert(m, get_scheme("8da2w"), 32, emb)
    with torch.no_grad():
        assert torch.equal(m(x).logits, fake)
    w = m.get_input_embeddings().weight
    # 8-bit values over the whole int8 range, not the Linears' 2-bit ones
    assert type(w).__name__ == "IntxUnpackedToInt8Tensor" and (int(w.qdata.min()), int(w.qdata.max())) == (-128, 127)
    q = m.model.layers[0].self_attn.q_proj.weight.qdata
    assert (int(q.min()), int(q.max())) == (-2, 1)
    qcfg = quantized_config(m, get_scheme("8da2w"), 32, emb)
    assert qcfg.include_input_output_embeddings


def test_tied_embeddings_cannot_be_quantized_alone(base):
    m = copy.deepcopy(base)
    m.config.tie_word_embeddings = True
    m.lm_head.weight = m.model.embed_tokens.weight
    with pytest.raises(UserError, match="qat.embedding=true needs untied embeddings"):
        apply_qat(m, FakeQuantConfig(enabled=True, scheme="8da4w", embedding=True), get_scheme("8da4w"))


def test_lora_targets_that_match_nothing(base):
    with pytest.raises(UserError, match=r"lora.target_modules \['qkv'\] match no Linear"):
        apply_lora(copy.deepcopy(base), LoRAConfig(enabled=True, target_modules=["qkv"]))
