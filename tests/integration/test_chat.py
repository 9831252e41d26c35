"""Chat rows say what they train: roles the template does not know are refused, ShareGPT rows are
read through data.chat.roles, and each source's use is logged with its drops counted by reason."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from qat.config import ChatConfig, DataConfig, DataSource
from qat.data import IGNORE, build_dataset, tokenize_chat
from qat.data.chat import RoleRule
from qat.data.stream import Position, RankStream
from qat.errors import UserError


def conversations(world, n=None):
    rows = [json.loads(l) for l in (world / "data/finetune.jsonl").read_text().splitlines()]
    return [r["messages"] for r in rows[:n]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def typo_file(world, tmp_path):
    """The world's chat rows with one misspelled role on line 17 (its first assistant reply)."""
    convs = conversations(world)
    assert convs[16][2]["role"] == "assistant"
    convs[16][2]["role"] = "assistent"
    return write_jsonl(tmp_path / "typo.jsonl", [{"messages": c} for c in convs])


def chat_cfg(path, cache, **kw):
    src = {k: kw.pop(k) for k in ("max_rows", "max_samples", "streaming", "column") if k in kw}
    return DataConfig(sources=[DataSource(path=str(path), kind="chat", **src)], seq_len=64, num_proc=1,
                      cache_dir=str(cache), **kw)


def error_lines(proc):
    return [l for l in proc.stderr.splitlines() if l.startswith("error:")]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_misspelled_role_stops_training_with_its_file_and_line(world, tmp_path, streaming, base_overrides, run_train):
    bad = typo_file(world, tmp_path)
    proc = run_train(base_overrides(world, tmp_path / "out") + [
        f"data.sources=[{{path: {bad}, kind: chat, streaming: {str(streaming).lower()}}}]", "data.shuffle=false"],
        check=False)
    errors = error_lines(proc)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0] == (f"error: data.sources[0]: {bad} line 17: role 'assistent' is not a role the tokenizer's "
                         f"chat template takes (system, user, assistant, tool); fix the row, or map the name with "
                         f"data.chat.roles (e.g. data.chat.roles={{assistent: assistant}})")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_misspelled_role_stops_a_world_of_two(world, tmp_path, base_overrides, run_train):
    """torchrun, world 2: the builder (rank 0) refuses the row, and rank 1, which waits on its build,
    raises the same line from the build's error record; one line, and torchrun ends quietly."""
    bad = typo_file(world, tmp_path)
    proc = run_train(base_overrides(world, tmp_path / "out") + [f"data.sources=[{{path: {bad}, kind: chat}}]"],
                     2, check=False)
    errors = error_lines(proc)
    assert len(errors) == 1 and f"{bad} line 17: role 'assistent'" in errors[0], proc.stderr[-3000:]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_waiting_ranks_raise_the_builders_error(world, tok, tmp_path):
    """The waiting ranks of a run raise the builder's line instead of waiting for an entry that never
    comes; a record left by another run is not theirs."""
    cfg = chat_cfg(typo_file(world, tmp_path), tmp_path / "cache")
    raised = {}

    def rank(name, builder, run_id):
        try:
            build_dataset(cfg, tok, builder=builder, run_id=run_id, log=lambda m: None)
        except UserError as e:
            raised[name] = str(e)

    waiters = [threading.Thread(target=rank, args=(f"w{i}", False, "run-1")) for i in range(2)]
    for t in waiters:
        t.start()
    rank("builder", True, "run-1")
    for t in waiters:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in waiters)
    assert raised["w0"] == raised["w1"] == raised["builder"] and "line 17: role 'assistent'" in raised["builder"]
    stranger = threading.Thread(target=rank, args=("other", False, "run-2"), daemon=True)
    stranger.start()
    stranger.join(timeout=3)
    assert stranger.is_alive() and "other" not in raised  # still waiting for its own builder


def sharegpt(convs):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]} for c in convs]


def entry_bytes(data):
    return [np.asarray(s.tokens).tobytes() + np.asarray(s.flags).tobytes() for s in data.sources]


@pytest.mark.parametrize("packing", ["documents", "pad"])
def test_sharegpt_rows_with_a_role_mapping_tokenize_like_openai_rows(world, tok, tmp_path, packing):
    convs = conversations(world, 40)
    openai = write_jsonl(tmp_path / "openai.jsonl", [{"messages": c} for c in convs])
    share = write_jsonl(tmp_path / "share.jsonl", sharegpt(convs))
    roles = ChatConfig(roles={"human": "user", "gpt": "assistant"})
    want = build_dataset(chat_cfg(openai, tmp_path / "c", packing=packing), tok, log=lambda m: None)
    got = build_dataset(chat_cfg(share, tmp_path / "c", packing=packing, chat=roles), tok, log=lambda m: None)
    assert len(want) == {"documents": 74, "pad": 40}[packing] and entry_bytes(got) == entry_bytes(want)
    # the loss flags are exactly tokenize_chat's supervised tokens: the assistant replies
    tokens, flags = np.asarray(got.sources[0].tokens), (np.asarray(got.sources[0].flags) & 1) != 0
    pairs = [(np.asarray(ids), np.asarray(labels) != IGNORE) for ids, labels in tokenize_chat(convs, tok)]
    if packing == "documents":  # the conversations back to back, cut into rows, the ragged tail dropped
        ids, loss = (np.concatenate(parts) for parts in zip(*pairs))
        assert np.array_equal(tokens.ravel(), ids[:tokens.size]) and np.array_equal(flags.ravel(), loss[:tokens.size])
    else:  # a conversation per row, cut at seq_len; the padding carries no loss
        for row, (ids, loss) in enumerate(pairs):
            n = min(64, len(ids))
            assert np.array_equal(tokens[row, :n], ids[:n]) and np.array_equal(flags[row, :n], loss[:n])
            assert not flags[row, n:].any()
    # the stream path reads the same rows from the same files
    stream = build_dataset(chat_cfg(share, tmp_path / "c", packing=packing, chat=roles, streaming=True, shuffle=False),
                           tok, log=lambda m: None)
    rows = RankStream(stream, 0, 1, Position(), frozenset()).rows()
    first = [next(rows) for _ in range(8)]
    assert np.array_equal(np.stack([r.tokens for r in first]), np.asarray(want.sources[0].tokens[:8]))
    assert np.array_equal(np.stack([r.flags for r in first]), np.asarray(want.sources[0].flags[:8]))


def test_sharegpt_names_without_a_mapping_are_refused_and_the_mapping_is_in_the_cache_key(world, tok, tmp_path):
    share = write_jsonl(tmp_path / "share.jsonl", sharegpt(conversations(world, 20)))
    with pytest.raises(UserError) as e:
        build_dataset(chat_cfg(share, tmp_path / "c"), tok)
    assert f"{share} line 1: role 'human' is not a role" in str(e.value)
    assert "data.chat.roles={human: user}" in str(e.value)
    with pytest.raises(UserError, match="role 'human', mapped by data.chat.roles onto 'usr', is not a role"):
        build_dataset(chat_cfg(share, tmp_path / "c", chat=ChatConfig(roles={"human": "usr", "gpt": "assistant"})), tok)
    logs = []
    mapping = {"human": "user", "gpt": "assistant"}
    build_dataset(chat_cfg(share, tmp_path / "c", chat=ChatConfig(roles=mapping)), tok, log=logs.append)
    build_dataset(chat_cfg(share, tmp_path / "c", chat=ChatConfig(roles=mapping)), tok, log=logs.append)
    build_dataset(chat_cfg(share, tmp_path / "c", chat=ChatConfig(roles={**mapping, "bot": "assistant"})), tok,
                  log=logs.append)
    assert ["built" in l for l in logs if "rows used" not in l] == [True, False, True]


STRICT = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n"
          "{% elif m['role'] == 'assistant' %}A: {{ m['content'] }}\n"
          "{% elif m['role'] == 'ipython' %}T: {{ m['content'] }}\n"
          "{% else %}{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}A: {% endif %}")
SKIPPING = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n"
            "{% elif m['role'] == 'assistant' %}A: {{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}A: {% endif %}")


@pytest.mark.parametrize("template", [STRICT, SKIPPING], ids=["raises", "skips"])
def test_a_template_that_does_not_know_a_role_refuses_it(world, tmp_path, template, tok):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world / "model")
    tok.chat_template = template
    rule = RoleRule(tok, {})
    assert not rule.prints_any_role
    assert [r for r in ("system", "user", "assistant", "tool", "ipython", "assistent") if rule.accepts(r)] == (
        ["user", "assistant", "ipython"] if template is STRICT else ["user", "assistant"])
    convs = conversations(world, 5)  # every one opens with a system message
    path = write_jsonl(tmp_path / "with_system.jsonl", [{"messages": c} for c in convs])
    with pytest.raises(UserError) as e:
        build_dataset(chat_cfg(path, tmp_path / "c"), tok)
    takes = "user, assistant, ipython" if template is STRICT else "user, assistant"
    assert f"{path} line 1: role 'system' is not a role the tokenizer's chat template takes ({takes})" in str(e.value)
    no_system = write_jsonl(tmp_path / "no_system.jsonl", [{"messages": c[1:]} for c in convs])
    assert len(build_dataset(chat_cfg(no_system, tmp_path / "c"), tok, log=lambda m: None)) > 0


def test_a_template_that_prints_any_role_takes_the_standard_ones_and_those_it_names(world, tok):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world / "model")  # <|{{ role }}|>: renders any name
    assert RoleRule(tok, {}).prints_any_role and RoleRule(tok, {}).accepted() == ["system", "user", "assistant", "tool"]
    tok.chat_template += "{% if messages[0]['role'] == 'ipython' %}{% endif %}"
    rule = RoleRule(tok, {})
    assert rule.accepted() == ["system", "user", "assistant", "tool", "ipython"] and not rule.accepts("assistent")


def test_the_use_of_each_source_is_logged_with_its_drops_by_reason(world, tok, tmp_path):
    """pad packing: rows past max_rows and max_samples are dropped, conversations longer than
    seq_len are cut, and those left without an assistant token are counted."""
    convs = conversations(world, 30)
    long_question = {"role": "user", "content": " ".join(["Where does everyone live?"] * 30)}
    for i in (3, 8):  # the answers come after seq_len tokens: cut off
        convs[i] = [long_question, {"role": "assistant", "content": "In Norland."}]
    convs[5] = convs[5][:2]  # system and user: nothing to learn
    path = write_jsonl(tmp_path / "known.jsonl", [{"messages": c} for c in convs])
    logs = []
    build_dataset(chat_cfg(path, tmp_path / "c", packing="pad", max_rows=25, max_samples=20), tok, log=logs.append)
    long_convs = sum(len(tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]) > 64
                     for c in convs[:25])
    assert long_convs >= 2
    assert logs[-1] == (f"sources[0] {path}: 20 of 30 rows used, in 20 sequences of 64 tokens; dropped: 5 past "
                        f"max_rows=25, 5 past max_samples=20; of the 25 rows read: {long_convs} cut to seq_len=64 "
                        f"(packing=pad), 3 without assistant tokens after the cut (kept, no loss)")


def test_documents_in_the_last_partial_sequence_are_counted(world, tok, tmp_path):
    """documents packing: n equal documents of l tokens fill n*l // 64 sequences; the documents
    that start after the last full one are dropped with it."""
    text = "Sara Birch lives in Norland and loves plums."
    l = len(tok(text)["input_ids"]) + 1  # + EOS

    def used_of(n):  # documents that start before the end of the last full sequence
        return -(-(n * l // 64) * 64 // l)

    n = next(k for k in range(40, 200) if used_of(k) < k)  # a count whose last partial sequence holds a start
    path = write_jsonl(tmp_path / "same.jsonl", [{"text": text}] * n)
    logs = []
    cfg = DataConfig(sources=[DataSource(path=str(path))], seq_len=64, num_proc=1, cache_dir=str(tmp_path / "c"))
    build_dataset(cfg, tok, log=logs.append)
    full, used = n * l // 64, used_of(n)
    assert logs[-1] == (f"sources[0] {path}: {used} of {n} rows used, in {full} sequences of 64 tokens; "
                        f"dropped: {n - used} in the last partial sequence")


def test_raise_together_gives_every_rank_the_line_of_the_rank_that_failed(tmp_path):
    """Two processes in a gloo group: only rank 1 holds an error, and both raise its line."""
    import torch.multiprocessing as mp

    mp.spawn(_raise_together_worker, args=(str(tmp_path),), nprocs=2, join=True)
    assert [(tmp_path / f"{r}.txt").read_text() for r in range(2)] == ["rank 1's row is bad"] * 2


def _raise_together_worker(rank, folder):
    import torch.distributed as dist

    from qat.distributed import raise_together

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        raise_together(None, torch.device("cpu"))  # nobody failed: nothing raised
        raise_together(UserError("rank 1's row is bad") if rank == 1 else None, torch.device("cpu"))
    except UserError as e:
        (Path(folder) / f"{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()

