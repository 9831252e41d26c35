"""Cross-entropy over a large vocabulary without whole-batch copies of the logits.

The plain loss, `F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())`,
makes three full-size tensors next to the model's logits: the shifted slice (`flatten` of a
non-contiguous view copies it), its fp32 copy, and the fp32 log-softmax that cross-entropy keeps
for backward. For a 4 x 2048 batch and a 128,256-token vocabulary the logits are 2.1 GB in bf16
and each fp32 copy 4.2 GB: about 10 GB of short-lived memory per micro-batch.

Here the labels are shifted instead of the logits (position t is scored against labels[t + 1];
the last position of each row against nothing), so the logits are only viewed, never copied, and
the loss runs over `rows_per_chunk` positions at a time: each chunk is cast to fp32, its
log-sum-exp and target logit taken, and nothing of it kept. Backward recomputes each chunk's
softmax and writes (softmax - one-hot) into one gradient tensor in the logits' own dtype: the
gradient the plain loss would produce, which autograd materializes for the model anyway.

The sum equals the plain loss up to float rounding (log-sum-exp against log-softmax: the
difference is at the last bits of each term; tests/unit/test_chunked_ce.py bounds it).
"""

from __future__ import annotations

import torch

from qat.data.sources import IGNORE

# fp32 elements per chunk: 2**26 = 256 MB. A 128K vocabulary gives 523 positions per chunk; a
# small vocabulary, the whole micro-batch at once.
CHUNK_ELEMENTS = 2 ** 26


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] targets aligned with the logits: position t predicts labels[t + 1]; the last, nothing."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE)
    return torch.cat([labels[:, 1:], pad], dim=1)


def rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        flat, tgt = logits.view(-1, logits.shape[-1]), targets.reshape(-1)
        total = torch.zeros((), device=logits.device, dtype=torch.float32)
        for start in range(0, flat.shape[0], rows):
            total = total + _chunk_nll(flat[start:start + rows], tgt[start:start + rows])
        ctx.save_for_backward(logits, targets)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets = ctx.saved_tensors
        flat, tgt = logits.view(-1, logits.shape[-1]), targets.reshape(-1)
        grad = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.rows):
            x, t = flat[start:start + ctx.rows].float(), tgt[start:start + ctx.rows]
            g = torch.softmax(x, dim=-1)
            keep = (t != IGNORE).unsqueeze(1)
            # minus the one-hot target; ignored rows are zeroed next (no nonzero(): no host sync)
            g.scatter_add_(1, t.clamp_min(0).unsqueeze(1), torch.full_like(keep, -1.0, dtype=g.dtype))
            g *= keep * grad_out
            grad[start:start + ctx.rows] = g.to(grad.dtype)
        return grad.view_as(logits), None, None


def _chunk_nll(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sum over the chunk's supervised rows of logsumexp(x) - x[target], in fp32."""
    x = x.float()
    keep = t != IGNORE
    target = x.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
    return ((torch.logsumexp(x, dim=-1) - target) * keep).sum()


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions (labels != IGNORE), in fp32.
    `logits` [B, L, V] as the model returns them; `labels` [B, L], unshifted."""
    if not logits.is_contiguous():
        logits = logits.contiguous()
    return _ChunkedCE.apply(logits, shifted_labels(labels), rows or rows_per_chunk(logits.shape[-1]))
