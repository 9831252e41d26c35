"""convert --formats pte: a short 8da4w QAT run on the tiny world, exported to an ExecuTorch .pte
(XNNPACK), loaded in ExecuTorch's runtime and compared with the converted model (quantized/)."""

import json

import pytest
import torch


pytest.importorskip("executorch.runtime", reason="ExecuTorch is the optional extra .[executorch]")

# Long enough that the tiny model's next-token choices are clear: with the 6-step default its
# greedy continuations sit on near-ties that int8 activation rounding can flip.
QAT_8DA4W = ["qat.enabled=true", "qat.scheme=8da4w", "qat.group_size=32", "training.steps=60",
             "optimizer.lr=3e-3"]


@pytest.fixture(scope="module")
def pte_export(world, tmp_path_factory, base_overrides, run_train, convert_cli):
    root = tmp_path_factory.mktemp("pte")
    run_train(base_overrides(world, root / "qat") + QAT_8DA4W)
    out = root / "export"
    convert_cli(["--checkpoint", root / "qat", "--out", out, "--formats", "pte"])
    return root, out


def heldout_rows(world, tok, window: int) -> list[torch.Tensor]:
    texts = [json.loads(line)["text"] for line in (world / "data" / "heldout_text.jsonl").read_text().splitlines()]
    return [torch.tensor([tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"][:window - 1]) for t in texts]


def test_pte_matches_the_converted_model_in_executorch_runtime(pte_export, world, tok):
    from transformers import AutoModelForCausalLM

    from qat.convert.pte import PteRunner, eager_greedy

    _, out = pte_export
    report = json.loads((out / "verify.json").read_text())["pte"]
    # 2 blocks x 7 int4 Linears + the lm_head: all in XNNPACK, in both methods
    assert report["linears"] == 15
    assert report["linears_by_method"] == {m: {"delegated": 15, "not_delegated": 0} for m in ("forward", "window")}
    assert report["greedy_equal"] is True and len(report["greedy_pte"]) == 16

    runner = PteRunner(out / "model.pte")
    assert runner.window == 64 and set(runner.program.method_names) == {"forward", "window"}
    model = AutoModelForCausalLM.from_pretrained(out / "quantized").eval()
    got, ref = [], []
    for row in heldout_rows(world, tok, runner.window):
        padded = torch.cat([row, torch.full((runner.window - len(row),), tok.pad_token_id)])[None]
        got.append(runner.window_logits(padded)[0, :len(row)])
        with torch.no_grad():
            ref.append(model(input_ids=row[None], use_cache=False).logits[0])
    got, ref = torch.cat(got).double(), torch.cat(ref).double()
    assert got.shape[0] > 1000
    # XNNPACK quantizes each token's activations to int8 with its own rounding and sums in another
    # order than torchao's reference: a value on a rounding edge moves one int8 step, so logits differ
    # by about 1% of their norm (measured 0.4%), never by a different weight.
    assert float((got - ref).norm() / ref.norm()) < 0.02
    assert float((got.argmax(-1) == ref.argmax(-1)).double().mean()) >= 0.99

    prompt = [int(t) for t in heldout_rows(world, tok, runner.window)[0][:12]]
    assert runner.greedy(prompt, 16) == eager_greedy(model, prompt, 16)


def test_pte_bad_input(pte_export, tmp_path, convert_cli):
    root, _ = pte_export
    for args, says in ((["--formats", "gguf"], "choose from pte"),
                       (["--formats", "pte", "--only-hf"], "drop --simulate/--only-hf"),
                       (["--formats", "pte", "--scheme", "8da2w"], "trained with QAT scheme '8da4w'")):
        p = convert_cli(["--checkpoint", root / "qat", "--out", tmp_path / "x", *args], check=False)
        lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 2 and len(lines) == 1 and says in lines[0], p.stderr[-2000:]
        assert not (tmp_path / "x").exists()


def test_bits_per_byte_from_executorch_logits(pte_export, world, tmp_path):
    from transformers import AutoModelForCausalLM

    from qat.convert.pte import bits_per_byte
    from qat.eval.pipeline import EvalTarget, evaluate_pte, heldout_texts
    from qat.model import load_tokenizer

    _, out = pte_export
    text = world / "data" / "heldout_text.jsonl"
    got = evaluate_pte("qat", EvalTarget(out / "quantized"), text, tmp_path / "qat_pte.json")
    assert got["runtime"] == "executorch" and json.loads((tmp_path / "qat_pte.json").read_text()) == got
    model = AutoModelForCausalLM.from_pretrained(out / "quantized").eval()
    tok = load_tokenizer(str(out / "hf"), key="--model", need_pad=True)

    def logits(ids):
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    ref = bits_per_byte(logits, tok, heldout_texts(text), 64)
    assert got["tokens"] == ref["tokens"] > 1000 and got["bytes"] == ref["bytes"]
    assert got["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=0.01)


def test_8da8w_per_channel_runs_in_xnnpack(world, tmp_path, base_overrides, run_train, convert_cli):
    """int8 weights per output channel: XNNPACK's qc8w kernel. Every Linear delegated in both
    methods; measured after 3 steps: top-1 100%, relative error 8e-4, 16 greedy tokens equal."""
    run_train(base_overrides(world, tmp_path / "qat") + ["qat.enabled=true", "qat.scheme=8da8w", "qat.group_size=null",
                                                         "training.steps=3"])
    convert_cli(["--checkpoint", tmp_path / "qat", "--out", tmp_path / "export", "--formats", "pte"])
    pte = json.loads((tmp_path / "export" / "verify.json").read_text())["pte"]
    assert pte["linears_by_method"] == {m: {"delegated": 15, "not_delegated": 0} for m in ("forward", "window")}
    assert pte["window_vs_converted"]["top1_agreement"] >= 0.99 and pte["greedy_equal"] is True, pte
