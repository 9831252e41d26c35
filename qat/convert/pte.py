"""ExecuTorch: the converted model as one .pte for phones, lowered to XNNPACK, and run in
ExecuTorch's own runtime (the Python bindings of the `executorch` wheel) to check it.

model.pte holds two methods, sharing one file so a phone app ships one artifact:

    forward  (input_ids [1, 1], cache_position [1]) -> logits [1, 1, V]: one token against a
             static KV cache (transformers' TorchExportableModuleWithStaticCache). The cache is a
             mutable buffer of the method: it persists between calls, so generation feeds the
             prompt one token at a time, then each chosen token.
    window   (input_ids [1, W]) -> logits [1, W, V]: a whole window without a cache, for
             evaluation (bits per byte, top-1 agreement) in one call per window.

Both are exported with torch.export and lowered with to_edge_transform_and_lower and the XNNPACK
partitioner: torchao's 8da4w Linear (int8 per-token dynamic activations, int4 weights per group)
becomes XNNPACK's dynamically quantized int4 kernel, 8da8w per channel its int8 one. Only schemes
XNNPACK runs are accepted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from qat.errors import UserError
from qat.schemes import Scheme

# What XNNPACK's quantized linear runs: int8 per-token dynamic activations with int4 weights per
# group or per channel (qb4w, qc4w), or int8 weights per channel (qc8w). Anything else fails to
# lower (int2 weights; int8 weights per group: "Only 4b group quantization is supported") or would
# fall back to portable kernels.
XNNPACK_SCHEMES = ("8da4w", "8da8w")
PER_CHANNEL_ONLY = ("8da8w",)
METHODS = ("forward", "window")


def check_pte_scheme(scheme: Scheme, embedding, group_size: Optional[int] = None) -> None:
    """Refuse, before any weight is read, what XNNPACK cannot run."""
    if scheme.name not in XNNPACK_SCHEMES:
        raise UserError(f"--formats pte: scheme {scheme.name!r} has no XNNPACK kernels; ExecuTorch export runs "
                        f"8da4w (per group or per channel) and 8da8w (per channel) (convert without --formats pte "
                        f"for other schemes)")
    if scheme.name in PER_CHANNEL_ONLY and group_size is not None:
        raise UserError(f"--formats pte: XNNPACK runs {scheme.name} with one scale per output channel, not per "
                        f"group of {group_size}: train (or PTQ) with group_size=null")
    if embedding is not None:
        raise UserError("--formats pte: a quantized input embedding has no XNNPACK kernel; train with "
                        "qat.quantize_embedding=false to export a .pte")


def require_executorch() -> None:
    try:
        import executorch.runtime  # noqa: F401  (the pybindings: lowering alone would not need them)
    except ImportError as e:
        raise UserError(f"--formats pte needs ExecuTorch ({e}): pip install -e '.[executorch]' && "
                        f"pip install --no-deps executorch==1.5.1 (docs/executorch.md)") from None


class _Window(nn.Module):
    """A whole window, no cache: logits for every position."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_programs(model: nn.Module, window: int, max_cache_len: int) -> dict:
    """{method: ExportedProgram} for the converted (torchao-quantized) model."""
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    model = model.eval()
    model.generation_config.cache_implementation = "static"
    ids = torch.zeros(1, window, dtype=torch.long)
    with torch.no_grad():
        cached = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_cache_len)
        # strict (dynamo) export: the non-strict trace of the static cache's in-place updates fails to
        # functionalize in torch 2.13 (run_decompositions: "expected compiled_fn to be GraphModule")
        step = cached.export(input_ids=ids[:, :1], cache_position=torch.tensor([0]), strict=True)
        whole = torch.export.export(_Window(model), (ids,), strict=False)
    return {"forward": step, "window": whole}


def lower(programs: dict):
    """ExecuTorch program (both methods), every supported op delegated to XNNPACK."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])


def linear_counts(edge, method: str) -> dict:
    """Linears inside XNNPACK delegates vs left to portable kernels, in one lowered method."""
    gm = edge.exported_program(method).graph_module
    outside = sum(1 for n in gm.graph.nodes if n.op == "call_function" and _is_linear(n))
    inside = 0
    for name, child in gm.named_children():
        if name.startswith("lowered_module"):
            assert child.backend_id == "XnnpackBackend", child.backend_id
            inside += sum(1 for n in child.original_module.graph.nodes if n.op == "call_function" and _is_linear(n))
    return {"delegated": inside, "not_delegated": outside}


def _is_linear(node) -> bool:
    name = str(node.target)
    return "aten.linear" in name or "aten.addmm" in name or "aten.mm." in name


def count_linears(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.Linear))


class PteRunner:
    """A .pte loaded in ExecuTorch's runtime."""

    def __init__(self, path: Path):
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(Path(path))
        self.window_method = self.program.load_method("window")
        meta = self.window_method.metadata
        self.window = int(meta.input_tensor_meta(0).sizes()[1])

    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[1, W] ids -> [1, W, V] logits."""
        return self.window_method.execute([ids.contiguous()])[0]

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Greedy tokens from the KV-cache method: the prompt a token at a time, then each argmax."""
        step = self.program.load_method("forward")  # a fresh load: an empty cache
        out, pos, logits = [], 0, None
        for tok in prompt:
            logits = step.execute([torch.tensor([[tok]]), torch.tensor([pos])])[0]
            pos += 1
        for _ in range(new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits = step.execute([torch.tensor([[nxt]]), torch.tensor([pos])])[0]
            pos += 1
        return out


def eager_greedy(model: nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """The converted model's greedy tokens, each from a full forward over the sequence so far."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def window_batches(token_rows: list[list[int]], window: int, pad: int):
    """Each row cut into [1, window] pieces overlapping by one token, so every token after a row's
    first is predicted exactly once; yields (ids, n) with n real tokens (the rest is `pad`)."""
    for row in token_rows:
        start = 0
        while start < len(row) - 1:
            piece = row[start:start + window]
            yield torch.tensor([piece + [pad] * (window - len(piece))]), len(piece)
            start += window - 1


def nll_sum(logits_fn, token_rows: list[list[int]], window: int, pad: int) -> tuple[float, int]:
    """(summed next-token negative log likelihood in nats, tokens scored)."""
    total, count = 0.0, 0
    for ids, n in window_batches(token_rows, window, pad):
        logp = torch.log_softmax(logits_fn(ids)[0, :n - 1].double(), -1)
        total -= float(logp.gather(-1, ids[0, 1:n, None]).sum())
        count += n - 1
    return total, count


def bits_per_byte(logits_fn, tokenizer, texts: list[str], window: int) -> dict:
    """Bits per UTF-8 byte of `texts` (each scored after a BOS, when the tokenizer has one)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    # verbose=False: a document longer than the model's max length is expected here (it is windowed)
    rows = [bos + tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts]
    nats, tokens = nll_sum(logits_fn, rows, window, tokenizer.pad_token_id or 0)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"bits_per_byte": nats / math.log(2) / n_bytes, "tokens": tokens, "bytes": n_bytes}


def runtime_checks(runner: PteRunner, model: nn.Module, probe: torch.Tensor, pad: Optional[int],
                   new_tokens: int = 16) -> dict:
    """The .pte in ExecuTorch's runtime vs the converted model on the probe rows: window logits
    (relative error, top-1 agreement on the real tokens) and greedy tokens from the KV-cache method."""
    from qat.convert.transforms import compare_logits

    got, ref = [], []
    for row in probe:
        real = row[row != pad] if pad is not None else row
        ids = real[:runner.window]
        padded = torch.cat([ids, torch.full((runner.window - len(ids),), pad or 0)])[None]
        got.append(runner.window_logits(padded)[0, :len(ids)])
        with torch.no_grad():
            ref.append(model(input_ids=ids[None], use_cache=False).logits[0].float())
    prompt = [int(t) for t in (probe[0][probe[0] != pad] if pad is not None else probe[0])[:8]]
    ours, theirs = eager_greedy(model, prompt, new_tokens), runner.greedy(prompt, new_tokens)
    return {"window_vs_converted": compare_logits(torch.cat(got), torch.cat(ref)),
            "greedy_prompt": prompt, "greedy_pte": theirs, "greedy_converted": ours,
            "greedy_equal": theirs == ours}
