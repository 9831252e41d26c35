"""llama.cpp itself on an exported .gguf (through llama-cpp-python): tokenization, next-token
logits, and bits per byte on held-out text.

llama.cpp computes in its own order and precision (Q8_0 activations times Q4_0/Q8_0 weights with
integer dot products and fp32 block sums, fp32 attention, f16 activations into an f16 output
head), so its logits are close to, not equal to, our fake-quantized forward: the check is the
share of positions whose top-1 token agrees, and the largest logit difference is reported.
Everything runs on llama.cpp's CPU backend (n_gpu_layers=0), the backend the Q8_0 activation
fake quantization models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from qat.errors import UserError


def has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


GGML_TYPE_F32 = 0


def load(path: Path, n_ctx: int):
    """llama.cpp's model and context for `path`, on the CPU, with logits at every position.

    The KV cache is f32, not llama.cpp's default f16: our forward keeps keys and values in fp32,
    and an f16 rounding there moves activations across Q8_0 rounding boundaries in the next layer
    (docs/gguf.md has the measured effect)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("llama.cpp's Python binding is not installed: pip install '.[gguf]' "
                        "(llama-cpp-python builds llama.cpp from source, minutes)") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                 n_gpu_layers=0, n_threads=1, verbose=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)


def logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] next-token logits of one sequence, from a fresh context."""
    llm.reset()  # position 0 again: eval drops the cache entries from there on
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def tokenize(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def top1_agreement(llm, probe: torch.Tensor, ref: torch.Tensor, pad_id: Optional[int]) -> dict:
    """llama.cpp vs `ref` logits [rows, seq, vocab] on the probe's rows (each up to its first pad)."""
    agree = total = 0
    max_diff = 0.0
    for row, ref_row in zip(probe.tolist(), ref):
        n = row.index(pad_id) if pad_id is not None and pad_id in row else len(row)
        got = torch.from_numpy(logits(llm, row[:n]))
        want = ref_row[:n].float()
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += n
        max_diff = max(max_diff, float((got - want).abs().max()))
    return {"top1_agreement": agree / total, "positions": total, "max_abs_logit_diff": max_diff}


def bits_per_byte(llm, texts: list[str], n_ctx: int) -> dict:
    """Bits per UTF-8 byte of `texts` from llama.cpp's logits: every token after a text's first is
    predicted, in windows of n_ctx tokens that overlap by one (each window starts afresh)."""
    nats = 0.0
    n_bytes = n_tokens = 0
    for text in texts:
        ids = tokenize(llm, text)
        start = 0
        while start < len(ids) - 1:
            window = ids[start:start + n_ctx]
            lg = torch.from_numpy(logits(llm, window)).double()
            lp = torch.log_softmax(lg[:-1], -1).gather(-1, torch.tensor(window[1:]).unsqueeze(-1))
            nats -= float(lp.sum())
            n_tokens += len(window) - 1
            start += n_ctx - 1
        n_bytes += len(text.encode("utf-8"))
    return {"bits_per_byte": nats / math.log(2) / n_bytes, "tokens": n_tokens, "bytes": n_bytes}
