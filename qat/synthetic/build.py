"""Build the tiny offline world: data files, a BPE tokenizer and a tiny Llama HF folder.

    python -m qat.synthetic.build --out assets/world

Everything is a pure function of (--seed, sizes), so two machines build identical files. The
model folder is a real HF folder (config, safetensors, tokenizer) that `from_pretrained` loads:
tests and the demo go through the same loading code as a hub model.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from qat.atomic import atomic_dir
from qat.synthetic import facts

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# The chat template keeps the "prefix property" (rendering the first k turns gives a prefix of
# rendering all of them), which qat.data relies on to find assistant spans in any template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build_data(out: Path, n_people: int, n_docs: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    people = facts.make_people(n_people, seed)
    n_ft = int(round(0.7 * n_people))
    ft_people, held_people = people[:n_ft], people[n_ft:]

    # Bios of every person appear in pretraining, so held-out people are known to the base model.
    pretrain = [{"text": facts.bio(p, rng)} for p in people for _ in range(3)]
    pretrain += [{"text": facts.pretrain_document(people, rng)} for _ in range(n_docs)]
    rng.shuffle(pretrain)
    finetune = [{"messages": facts.qa_conversation(p, rng)} for p in ft_people for _ in range(6)]
    rng.shuffle(finetune)
    heldout_qa = [{"messages": facts.qa_conversation(p, rng)} for p in held_people for _ in range(4)]
    heldout_text = [{"text": facts.pretrain_document(people, rng)} for _ in range(max(20, n_docs // 10))]

    n_mc = max(40, min(900, 8 * n_people))
    mc = [facts.mc_item(rng.choice(people), people, rng, i, "val") for i in range(n_mc)]
    mc_train = [facts.mc_item(rng.choice(people), people, rng, i, "train") for i in range(20)]

    d = out / "data"
    write_jsonl(d / "pretrain.jsonl", pretrain)
    write_jsonl(d / "finetune.jsonl", finetune)
    write_jsonl(d / "heldout_qa.jsonl", heldout_qa)
    write_jsonl(d / "heldout_text.jsonl", heldout_text)
    e = out / "eval"
    write_jsonl(e / "hellaswag" / "train.jsonl", mc_train)
    write_jsonl(e / "hellaswag" / "validation.jsonl", mc)
    pages = [{"page": r["text"]} for r in heldout_text]
    for split in ("train", "validation", "test"):
        write_jsonl(e / "wikitext" / f"{split}.jsonl", pages)
    return {"pretrain": len(pretrain), "finetune": len(finetune), "heldout_qa": len(heldout_qa),
            "heldout_text": len(heldout_text), "hellaswag": len(mc)}


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIALS[3:], chat_template=CHAT_TEMPLATE, model_max_length=512)


def tiny_llama_config(vocab_size: int, hidden: int, layers: int, tie: bool, tok):
    from transformers import LlamaConfig

    # Dimensions are multiples of 128 so that every quantization group size up to 128 divides
    # every Linear's in_features.
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)


def build_model(out: Path, tok, hidden: int, layers: int, tie: bool, seed: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden, layers, tie, tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_world(out: Path, n_people: int = 120, n_docs: int = 3000, vocab_size: int = 1024,
                hidden: int = 128, layers: int = 2, tie: bool = False, seed: int = 0) -> Path:
    """Write the world into `out` atomically (a temporary folder renamed at the end)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        counts = build_data(tmp, n_people, n_docs, seed)
        texts = [json.loads(l)["text"] for l in open(tmp / "data" / "pretrain.jsonl")]
        tok = build_tokenizer(texts, vocab_size)
        tok.save_pretrained(tmp / "tokenizer")
        build_model(tmp / "model", tok, hidden, layers, tie, seed)
        spec = dict(n_people=n_people, n_docs=n_docs, vocab_size=vocab_size, hidden=hidden,
                    layers=layers, tie=tie, seed=seed, counts=counts)
        (tmp / "world.json").write_text(json.dumps(spec, indent=2))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/world", help="output folder (replaced atomically)")
    p.add_argument("--people", type=int, default=120, help="number of people in the world")
    p.add_argument("--docs", type=int, default=3000, help="extra pretraining documents")
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    p.add_argument("--hidden", type=int, default=128, help="tiny Llama hidden size (multiple of 128)")
    p.add_argument("--layers", type=int, default=2, help="tiny Llama decoder layers")
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = build_world(Path(a.out), a.people, a.docs, a.vocab, a.hidden, a.layers, a.tie, a.seed)
    print(f"world written to {out}: {json.loads((out / 'world.json').read_text())['counts']}")


if __name__ == "__main__":
    main()
