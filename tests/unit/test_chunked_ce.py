"""The chunked cross-entropy against the plain one: the same sum and the same gradient, in fp32 and
bf16 logits, whatever the chunking, with ignored positions and whole ignored rows."""

import pytest
import torch
import torch.nn.functional as F

from qat.chunked_ce import cross_entropy_sum, shifted_labels
from qat.data.sources import IGNORE


def plain(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")


def batch(dtype, vocab=97, b=3, length=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(b, length, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (b, length), generator=g)
    labels[0, :5] = IGNORE  # a prompt
    labels[-1] = IGNORE  # a row with no supervised token
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 16, 1000])
def test_sum_and_gradient_equal_the_plain_loss(dtype, rows):
    logits, labels = batch(dtype)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = cross_entropy_sum(a, labels, rows)
    ref = plain(b, labels)
    # fp32 log-sum-exp vs log-softmax: a few ulp per term over 32 terms of about 10
    assert ours.dtype == torch.float32 and abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    (1.5 * ours).backward()
    (1.5 * ref).backward()
    assert a.grad.dtype == dtype
    if dtype == torch.float32:
        assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-6)
    else:  # both round the same fp32 gradient to bf16: at most one bf16 step apart
        step = b.grad.float().abs().clamp_min(2 ** -126) * 2 ** -7
        assert ((a.grad.float() - b.grad.float()).abs() <= step).all()
    ignored = shifted_labels(labels) == IGNORE
    assert (a.grad[ignored] == 0).all()  # the last position of each row, the prompt, the empty row


def test_the_logits_are_not_copied_whole():
    """Saved for backward: the logits themselves (the same storage), not a shifted or fp32 copy."""
    logits, labels = batch(torch.bfloat16, vocab=64, b=3, length=8)
    logits.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy_sum(logits, labels, rows=4)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr() and big[0].dtype == torch.bfloat16


def test_no_grad_forward_for_the_log():
    logits, labels = batch(torch.float32)
    with torch.no_grad():
        ours, ref = cross_entropy_sum(logits, labels).item(), plain(logits, labels).item()
    assert abs(ours - ref) <= 1e-5 * ref
