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
    from qat.convert.gguf_writer import gguf_name, permute_rows
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


def test_llama_cpp_tokenizes_and_predicts_as_our_converted_model(q4_export, world, tok):
    from qat.convert.gguf_check import bits_per_byte, load, logits, tokenize
    from qat.convert.simulated import load_simulated

    llm = load(q4_export / "export" / "gguf" / "model-q4_0.gguf", n_ctx=512)
    ours = load_simulated(q4_export / "export" / "hf", "q4_0", None)
    agree = total = 0
    nats = 0.0
    texts = heldout_texts(world)
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tokenize(llm, text) == ids
        with torch.no_grad():
            ref = ours(torch.tensor([ids])).logits[0].double()
        got = torch.from_numpy(logits(llm, ids)).double()
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
        nats -= float(torch.log_softmax(ref[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    assert agree / total >= 0.99, (agree, total)
    ours_bpb = nats / math.log(2) / sum(len(t.encode()) for t in texts)
    theirs = bits_per_byte(llm, texts, 512)
    assert theirs["tokens"] == total - len(texts)
    assert abs(theirs["bits_per_byte"] - ours_bpb) <= 0.01 * ours_bpb, (theirs, ours_bpb)
    report = json.loads((q4_export / "export" / "verify.json").read_text())
    assert report["gguf"]["llama_cpp_vs_simulated"]["top1_agreement"] >= 0.99
    assert report["gguf"]["files"]["model-q4_0.gguf"]["tensors"] == {"q4_0": 14, "f32": 7}


def test_gguf_refusals(q4_export, world, tmp_path, convert_cli, base_overrides, run_train):
    p = convert_cli(["--checkpoint", q4_export, "--gguf", "f16", "--only-hf", "--out", tmp_path / "a"], check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
        "error: --gguf writes quantized codes; it cannot go with --only-hf"
    assert not (tmp_path / "a").exists()
