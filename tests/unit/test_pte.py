"""ExecuTorch export: what is refused before any weight is read, and the bits-per-byte windows."""

import math

import pytest
import torch

from qat.convert.plan import check_formats
from qat.convert.pte import nll_sum, window_batches
from qat.errors import UserError
from qat.schemes import get_scheme


@pytest.mark.parametrize("scheme", ["8da2w", "intx4-weight-only", "int4-weight-only", "float8", "nvfp4"])
def test_schemes_xnnpack_cannot_run_are_refused(scheme):
    with pytest.raises(UserError, match=rf"scheme '{scheme}' has no XNNPACK kernels; ExecuTorch export runs "
                                        r"8da4w \(per group or per channel\) and 8da8w \(per channel\)"):
        check_formats(("pte",), get_scheme(scheme), None, "real")


def test_8da8w_runs_in_xnnpack_per_channel_only():
    check_formats(("pte",), get_scheme("8da8w"), None, "real", group_size=None)
    check_formats(("pte",), get_scheme("8da4w"), None, "real", group_size=32)
    with pytest.raises(UserError, match="XNNPACK runs 8da8w with one scale per output channel, not per group of 32"):
        check_formats(("pte",), get_scheme("8da8w"), None, "real", group_size=32)


def test_unknown_format_and_hf_only_are_refused():
    with pytest.raises(UserError, match="not a format convert writes; choose from pte"):
        check_formats(("gguf",), get_scheme("8da4w"), None, "real")
    with pytest.raises(UserError, match="drop --simulate/--only-hf"):
        check_formats(("pte",), get_scheme("8da4w"), None, "none")
    with pytest.raises(UserError, match="would be bf16: rerun with --dtype fp32"):
        check_formats(("pte",), get_scheme("8da4w"), None, "real", "bf16")


def test_windows_predict_every_token_once():
    rows = [list(range(10)), [7, 8]]
    got = [(ids[0].tolist(), n) for ids, n in window_batches(rows, 4, pad=-1)]
    assert got == [([0, 1, 2, 3], 4), ([3, 4, 5, 6], 4), ([6, 7, 8, 9], 4), ([7, 8, -1, -1], 2)]


def test_nll_of_uniform_logits_is_log_vocab_per_token():
    nats, tokens = nll_sum(lambda ids: torch.zeros(1, ids.shape[1], 16), [list(range(10))], 4, pad=0)
    assert tokens == 9 and nats == pytest.approx(9 * math.log(16))
