"""GPU checks (marker `gpu`) of the paths built and tested on the CPU after tests/gpu/test_gpu.py: each
mirrors its CPU test and compares CUDA with the CPU reference. `bench/gpu_check.sh tests` runs this
file first (unit-sized checks, ~30 s on an H100), then tests/gpu/test_gpu.py.

- packed `documents` rows at batch 2: a document's logits equal its logits alone, on CUDA with
  sdpa and eager (fp32 and bf16), and with flash_attention_2 through `flash_varlen_kwargs` when
  transformers finds the flash-attn package (tests/unit/test_data.py, tests/integration/test_stream.py);
- the memory-mapped loader's CUDA prefetcher (pinned memory, side stream, event) gives the CPU
  loader's batches bitwise, also when a rewind makes the prefetched indices wrong (test_data.py);
- the stream loader on CUDA gives the CPU's rows (test_stream.py);
- learned scales (qat.learn_scales): fake-quantized weights equal the CPU's exactly, the LSQ scale
  gradient and the weight and input gradients match the CPU's (test_fake_quant.py);
- MoE experts: fake-quantized fused expert weights equal the CPU's exactly, forward and gradients
  match, with transformers' eager and grouped_mm expert forwards (test_moe.py).

Each body is a helper that takes the device, so its comparisons can be exercised CPU against CPU
on a machine without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qat.config import DataConfig, DataSource

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def text_data(world: Path, tok, cache: Path, seq_len: int, streaming: bool = False):
    src = DataSource(path=str(world / "data/pretrain.jsonl"), max_rows=300, streaming=streaming)
    from qat.data import build_dataset

    return build_dataset(DataConfig(sources=[src], seq_len=seq_len, num_proc=1, cache_dir=str(cache)), tok)


# --- packed documents: each document attends only to itself, on CUDA ---------------------------

def documents(pos: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document of a batch of packed rows (a document starts at position 0)."""
    out = []
    for r in range(pos.shape[0]):
        starts = (pos[r] == 0).nonzero().view(-1).tolist() + [pos.shape[1]]
        out += [(r, s, e) for s, e in zip(starts[:-1], starts[1:])]
    return out


def document_logits(model_dir: Path, ids, pos, device: str, dtype, attn: str):
    """fp32 CPU copies of the logits of the packed rows (with `flash_varlen_kwargs`, as training calls
    the model), of each document alone, and of the rows without position ids (attending across)."""
    from transformers import AutoModelForCausalLM

    from qat.data import flash_varlen_kwargs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(device).eval()
    ids, pos = ids.to(device), pos.to(device)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False, **flash_varlen_kwargs(model, pos)).logits
        crossing = model(input_ids=ids, use_cache=False).logits
        alone = {d: model(input_ids=ids[d[0]:d[0] + 1, d[1]:d[2]], use_cache=False).logits[0].float().cpu()
                 for d in documents(pos.cpu())}
    return packed.float().cpu(), alone, crossing.float().cpu()


def check_documents_apart(packed, alone, crossing, tol: float) -> None:
    """Every document's logits inside the packed rows are within `tol` of its logits alone, and at
    least two documents that do not start a row would be far from them if they attended across."""
    told = 0
    for (r, s, e), ref in alone.items():
        err = (packed[r, s:e] - ref).abs().max().item()
        assert err <= tol, (r, s, e, err)
        if s > 0:
            assert (crossing[r, s:e] - ref).abs().max().item() > 10 * tol  # the check can tell
            told += 1
    assert told >= 2


# Tolerances, max |logit difference| between a document in the packed rows and alone (the tiny
# world's logits are ~1; attending across moves them by ~1, measured 0.95 on the CPU):
# fp32: the CPU test's 1e-5 holds within one kernel family (measured 6e-7); on CUDA the masked packed
# call and the causal call alone take different sdpa kernels and cuBLAS tilings (other shapes), each
# exact to fp32 rounding, so 1e-4, still far below what attending across gives.
# bf16: every matmul output rounds to 8 bits (2**-8 relative), and the two calls round at different
# points: one bf16 step at |logit| ~1 is 0.004, measured on the CPU; 0.03 allows ~8 steps of
# kernel-dependent rounding through 2 layers.
DOC_TOL = {torch.float32: 1e-4, torch.bfloat16: 0.03}


@pytest.fixture(scope="module")
def packed_rows(world, tok, tmp_path_factory):
    """Two packed `documents` rows of 512 tokens (several documents each), as the CPU test takes them."""
    data = text_data(world, tok, tmp_path_factory.mktemp("cache"), 512)
    ids, _, pos = data.batch(torch.arange(2))
    return ids, pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_document_inside_a_packed_row_has_its_logits_alone_on_cuda(world, packed_rows, attn, dtype, rel_error):
    check_packed_documents(world / "model", *packed_rows, attn, dtype, "cuda", rel_error=rel_error)


def check_packed_documents(model_dir: Path, ids, pos, attn: str, dtype, device: str, *, rel_error) -> None:
    packed, alone, crossing = document_logits(model_dir, ids, pos, device, dtype, attn)
    check_documents_apart(packed, alone, crossing, DOC_TOL[dtype])
    ref = document_logits(model_dir, ids, pos, "cpu", torch.float32, attn)[0]  # the CPU's fp32 packed rows
    assert rel_error(packed, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


def flash_attention_2_missing() -> str | None:
    """Why transformers would refuse attn_implementation="flash_attention_2" here, or None.
    transformers decides with `is_flash_attn_2_available()`: the flash-attn distribution (>= 2.3.3)
    installed and CUDA present; its `kernels` hub fallback would download, which the device cannot."""
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "transformers' flash_attention_2 needs the flash-attn package (>= 2.3.3), not installed here"
    if torch.cuda.get_device_capability() < (8, 0):
        return "flash-attn 2 needs sm >= 8.0"
    return None


def test_flash_varlen_kwargs_keep_documents_apart_on_cuda(world, packed_rows, rel_error):
    """The real flash_attn_varlen_func at batch 2 (tests/integration/test_stream.py checks the kwargs against a
    reference varlen attention on the CPU): each document's logits are its logits alone (flash, bf16),
    and the packed rows match sdpa's in bf16."""
    why = flash_attention_2_missing()
    if why:
        pytest.skip(why)
    ids, pos = packed_rows
    packed, alone, crossing = document_logits(world / "model", ids, pos, "cuda", torch.bfloat16, "flash_attention_2")
    check_documents_apart(packed, alone, crossing, DOC_TOL[torch.bfloat16])
    sdpa = document_logits(world / "model", ids, pos, "cuda", torch.bfloat16, "sdpa")[0]
    assert rel_error(packed, sdpa) < 2e-2


# --- the data loaders on CUDA: the CPU's batches, bitwise -----------------------------------------

def on_host(batches) -> tuple[list, set]:
    """(the micro-batches copied to the CPU, the devices they were on)."""
    devices = {t.device for b in batches for t in b if t is not None}
    return [tuple(t.cpu() if t is not None else None for t in b) for b in batches], devices


def memmap_steps(data, device: str, steps: int = 6, save_at: int = 1, rewind_at: int = 4):
    """Each step's micro-batches from MemmapLoader (rank 1 of 2, accum 2), with a rewind to the
    state saved before step `save_at` just before step `rewind_at`: the look-ahead then holds the
    wrong step, which the loader must notice. Returns (steps on the host, devices, whether the
    prefetched indices were the wrong ones at the rewind)."""
    from qat.data import MemmapLoader, StepSampler

    sampler = StepSampler(len(data), 8, 1, True)
    loader = MemmapLoader(data, sampler, torch.device(device), rank=1, world=2, accum=2)
    out, devices, stale = [], set(), None
    try:
        for i in range(steps):
            if i == save_at:
                saved = loader.state_dict()
            if i == rewind_at:
                loader.load_state_dict(saved)
                peek = StepSampler(len(data), 8, 1, True)
                peek.load_state_dict(saved)
                stale = not torch.equal(loader.prefetch._pending[0], peek.next_step())
            host, devs = on_host(loader.next_batches())
            out.append(host)
            devices |= devs
    finally:
        loader.close()
    return out, devices, stale


def assert_same_steps(got: list, ref: list) -> None:
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert len(g) == len(r), i
        for gb, rb in zip(g, r):
            assert all((a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
                       for a, b in zip(gb, rb)), i


def target(device: str) -> torch.device:
    """The device tensors sent to `device` land on ("cuda" means the current GPU)."""
    d = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d


def test_memmap_prefetcher_on_cuda_gives_the_cpu_batches_bitwise(world, tok, tmp_path):
    check_memmap_prefetcher(text_data(world, tok, tmp_path, 64), "cuda")


def check_memmap_prefetcher(data, device: str) -> None:
    ref, _, _ = memmap_steps(data, "cpu")
    got, devices, stale = memmap_steps(data, device)
    assert stale is True  # the rewound step was loaded directly, not taken from the look-ahead
    assert_same_steps(got, ref)
    assert_same_steps(got[4:5], ref[1:2])  # the rewind repeated step 1
    assert devices == {target(device)}, devices


def stream_steps(data, device: str, steps: int = 4) -> tuple[list, set]:
    """StreamLoader's micro-batches, fresh at rank 1 of 2 (batch 2, accum 2), then resumed by one
    rank from a 2-rank checkpoint (as in tests/integration/test_stream.py) of the same shuffled order."""
    from qat.data import StreamLoader

    out, devices = [], set()
    fresh = StreamLoader(data, 1, 2, 2, 2, torch.device(device))
    resumed = StreamLoader(data, 0, 1, 2, 1, torch.device(device))
    resumed.load_state_dict({"stream": True, "world": 2, "positions": [[9, 0], [4, 7]], "skip": [],
                             "docs_per_epoch": None, **data.order_record()})
    try:
        for loader in (fresh, resumed):
            for _ in range(steps):
                host, devs = on_host(loader.next_batches())
                out.append(host)
                devices |= devs
    finally:
        fresh.close()
        resumed.close()
    return out, devices


def test_stream_loader_on_cuda_gives_the_cpu_rows(world, tok, tmp_path):
    check_stream_loader(text_data(world, tok, tmp_path, 64, streaming=True), "cuda")


def check_stream_loader(data, device: str) -> None:
    ref, _ = stream_steps(data, "cpu")
    got, devices = stream_steps(data, device)
    assert_same_steps(got, ref)
    assert devices == {target(device)}, devices


# --- learned scales (LSQ) on CUDA ------------------------------------------------------------------

def sample(shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """CPU random data with a few large outliers, which stretch the scales as real weights do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    return torch.where(torch.rand(shape, generator=g) < 0.002, x * 20, x).to(dtype)


def learned_scale_case(device: str, bits: int, act: bool, dtype=torch.float32, *, PinnedToCPU) -> dict:
    """Everything a learned scale touches, computed on `device` from the same CPU data, returned on
    the CPU: the rule's start, a re-init from a moved weight, the fake-quantized weight and mask at a
    moved scale (some weights clip, some grid points shift), and the gradients of x, w and the scale."""
    from qat.fake_quant import Int8PerToken, IntxWeight, QATLinear, fake_quant_linear
    from qat.learned_scales import reinit_at_start

    # the activations quantized on the CPU for every device (tests/gpu/conftest.py): identical operands
    fq, afq = IntxWeight(bits, 32), (PinnedToCPU(Int8PerToken()) if act else None)
    w = sample((96, 256), 20, 0.05, dtype)
    move = torch.empty(96, 8).uniform_(0.6, 1.4, generator=torch.Generator().manual_seed(21))
    scale = (fq.init_scale(w) * move).to(device)  # the CPU's rule, moved: the same start everywhere
    out = {"init": fq.init_scale(w.to(device)).cpu()}
    wq, mask = fq(w.to(device), scale)
    out.update(wq=wq.cpu(), mask=mask.cpu())
    lin = QATLinear.from_linear(torch.nn.Linear(256, 96, bias=False, dtype=dtype), fq, afq, learn_scale=True)
    with torch.no_grad():
        lin.weight.copy_(w + 0.01)  # trained during the fake-quant delay
    lin.to(device)
    reinit_at_start(lin)
    out["reinit"] = lin.weight_scale.detach().cpu()
    wd, s = w.to(device).requires_grad_(), scale.clone().requires_grad_()
    x = sample((4, 7, 256), 22, 2.0, dtype).to(device).requires_grad_()
    fake_quant_linear(x, wd, None, fq, afq, s).backward(sample((4, 7, 96), 23, 1.0, dtype).to(device))
    out.update(gx=x.grad.cpu(), gw=wd.grad.cpu(), gs=s.grad.cpu())
    return out


@pytest.mark.parametrize("bits, act", [(2, False), (4, True)], ids=["intx2-weight-only", "8da4w"])
def test_learned_scales_on_cuda_match_cpu(bits, act, PinnedToCPU, within_one_ulp):
    check_learned_scales(bits, act, "cuda", PinnedToCPU=PinnedToCPU, within_one_ulp=within_one_ulp)


def check_learned_scales(bits: int, act: bool, device: str, *, PinnedToCPU, within_one_ulp) -> None:
    ref, got = learned_scale_case("cpu", bits, act, PinnedToCPU=PinnedToCPU), learned_scale_case(device, bits, act, PinnedToCPU=PinnedToCPU)
    check_scales_and_grid(ref, got, torch.float32, within_one_ulp=within_one_ulp)
    assert (~ref["mask"]).any()  # the moved scales clip some weights
    # identical operands (the same scale, weights and CPU-quantized activations); dx, dw come from
    # fp32 matmuls (TF32 off by default) in another reduction order: close, not
    # bitwise; the scale's gradient sums dL/dwq (a matmul) times (q - v) over each group of 32:
    # the same reduction-order error, relative to the sum, so the same rtol with an atol at the
    # size of a cancelled sum
    torch.testing.assert_close(got["gx"], ref["gx"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["gw"], ref["gw"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["gs"], ref["gs"], rtol=1e-4, atol=1e-5 * float(ref["gs"].abs().max()))
    assert torch.equal(got["gw"] == 0, ref["gw"] == 0)  # the clip mask: exact integer decisions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_learned_scale_forward_on_cuda_equals_cpu_in_the_weight_dtype(dtype, PinnedToCPU, within_one_ulp):
    """`effective_scale` casts the fp32 parameter to the weight's dtype: bf16 weights included, the
    fake-quantized weight is bitwise the CPU's."""
    check_learned_scale_forward(dtype, "cuda", PinnedToCPU=PinnedToCPU, within_one_ulp=within_one_ulp)


def check_learned_scale_forward(dtype, device: str, *, PinnedToCPU, within_one_ulp) -> None:
    ref, got = learned_scale_case("cpu", 4, False, dtype, PinnedToCPU=PinnedToCPU), learned_scale_case(device, 4, False, dtype, PinnedToCPU=PinnedToCPU)
    check_scales_and_grid(ref, got, dtype, within_one_ulp=within_one_ulp)


def check_scales_and_grid(ref: dict, got: dict, dtype, *, within_one_ulp) -> None:
    """The fake quant at a given scale is elementwise: bitwise. The rule's scale absmax / (qmax + 1/2)
    divides by a Python float, which CUDA does through its reciprocal: fp32 scales within one ulp
    (tests/gpu/conftest.py); in bf16 the rounding to 8 bits hides it (bitwise). The re-init computes the rule
    on an fp32 copy of the weight, so it is within one ulp in both."""
    for k in ("wq", "mask"):
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    bf16 = dtype == torch.bfloat16
    assert torch.equal(got["init"], ref["init"]) if bf16 else within_one_ulp(got["init"], ref["init"])
    assert within_one_ulp(got["reinit"], ref["reinit"])


# --- MoE experts on CUDA -----------------------------------------------------------------------------

MOE = {"qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=128),
       "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)}


def moe_case(kind: str, impl: str, device: str, dtype=torch.float32, pin: bool = False, *, PinnedToCPU) -> dict:
    """A tiny MoE model (tests/unit/test_moe.py's), intx4 QAT on its experts, the expert forward `impl`
    of transformers (eager: a loop over experts; grouped_mm: torch's grouped GEMM, which on CUDA is
    CUTLASS in bf16 on sm90 and a loop of mm otherwise, or transformers' own fallback op): fake-quantized
    expert weights, masks, the rule's scales and the weights as [E * out, in] rows, then logits and
    expert weight gradients, on the CPU. `pin`: the forward uses CPU-quantized weights (identical
    operands on every device, tests/gpu/conftest.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat import moe
    from qat.config import FakeQuantConfig
    from qat.model import apply_qat, decoder_blocks
    from qat.schemes import get_scheme

    cfg = AutoConfig.for_model(kind, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=32, vocab_size=96, max_position_embeddings=64,
                               **MOE[kind])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.set_experts_implementation(impl)
    apply_qat(model, FakeQuantConfig(enabled=True, scheme="intx4-weight-only", group_size=32),
              get_scheme("intx4-weight-only"))
    model.to(device=device, dtype=dtype).eval()
    ex = next(iter(moe.experts_modules(decoder_blocks(model)).values()))
    names = moe.expert_weight_names(ex)
    out = {}
    with torch.no_grad():
        for n in names:
            wq, mask = ex.expert_fqs[n](ex._parameters[n])
            out[f"wq.{n}"], out[f"mask.{n}"] = wq.cpu(), mask.cpu()
            w2d = expert_rows(ex, n)
            wq2d, mask2d = ex.expert_fqs[n].fq2d(w2d)
            out.update({f"w2d.{n}": w2d.cpu(), f"wq2d.{n}": wq2d.cpu(), f"mask2d.{n}": mask2d.cpu(),
                        f"scale.{n}": ex.expert_fqs[n].fq2d.init_scale(w2d).cpu()})
    if pin:
        pin_to_cpu(model, PinnedToCPU=PinnedToCPU)
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(30)).to(device)
    logits = model(x).logits
    logits.float().square().mean().backward()
    out["logits"] = logits.detach().float().cpu()
    out.update({f"grad.{n}": ex._parameters[n].grad.float().cpu() for n in names})
    return out


def expert_rows(ex, name: str) -> torch.Tensor:
    """A 3D expert weight as the [E * out, in] rows its fake quantizer groups (Experts3D)."""
    w = ex._parameters[name]
    w = w.transpose(1, 2) if ex.expert_fqs[name].transposed else w
    return w.reshape(-1, w.shape[-1])


def pin_to_cpu(model, *, PinnedToCPU) -> None:
    """Every fake quantizer of the model (Linears and experts) quantizes on the CPU."""
    from qat import moe
    from qat.fake_quant import QATLinear
    from qat.model import decoder_blocks

    for mod in model.modules():
        if isinstance(mod, QATLinear):
            mod.weight_fq = PinnedToCPU(mod.weight_fq)
            mod.act_fq = PinnedToCPU(mod.act_fq) if mod.act_fq is not None else None
    for ex in moe.experts_modules(decoder_blocks(model)).values():
        for fq in ex.expert_fqs.values():
            fq.fq2d = PinnedToCPU(fq.fq2d)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("kind", list(MOE))
def test_moe_expert_fake_quant_on_cuda_matches_cpu(kind, impl, PinnedToCPU, check_codes_at_ties, grid_codes, rel_error, within_one_ulp):
    """fp32, CUDA against the CPU with the same expert forward. Our code calls no grouped kernel: it
    substitutes the fake-quantized 3D weights and runs the model's own expert forward."""
    check_moe(kind, impl, "cuda", PinnedToCPU=PinnedToCPU, check_codes_at_ties=check_codes_at_ties, grid_codes=grid_codes,
              rel_error=rel_error, within_one_ulp=within_one_ulp)


def check_moe(kind: str, impl: str, device: str, *, PinnedToCPU, check_codes_at_ties, grid_codes, rel_error,
              within_one_ulp) -> None:
    ref = moe_case(kind, impl, "cpu", pin=True, PinnedToCPU=PinnedToCPU)
    got = moe_case(kind, impl, device, pin=True, PinnedToCPU=PinnedToCPU)
    for n in [k[len("w2d."):] for k in ref if k.startswith("w2d.")]:
        # fp32 scales absmax / 7.5 within one ulp; a code and its clip decision move only at a
        # rounding tie, at most the absmax of a group of 32 (tests/gpu/conftest.py)
        s, s_ref, rows = got[f"scale.{n}"], ref[f"scale.{n}"], ref[f"w2d.{n}"].shape[0]
        assert within_one_ulp(s, s_ref), n
        ratio = ref[f"w2d.{n}"].double().reshape(rows, -1, 32) / s_ref.double().reshape(rows, -1, 1)
        ties = check_codes_at_ties(grid_codes(got[f"wq2d.{n}"], s, rows, 32),
                                   grid_codes(ref[f"wq2d.{n}"], s_ref, rows, 32), ratio, 1 / 32)
        flips = got[f"mask2d.{n}"] != ref[f"mask2d.{n}"]
        assert not (flips & ~ties.reshape(flips.shape)).any(), n
    assert any((~ref[k]).any() for k in ref if k.startswith("mask."))  # int4 clips
    # identical CPU-quantized weights on both devices; fp32 matmuls in another order; the router
    # sees the same logits to ~1e-6, far from a tie
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-4, atol=1e-5)
    for k in ref:
        if k.startswith("grad."):
            assert rel_error(got[k], ref[k]) < 1e-4, k
            assert torch.equal(got[k] == 0, ref[k] == 0), k  # clipped entries and unrouted experts


@pytest.mark.parametrize("kind", list(MOE))
def test_moe_grouped_mm_in_bf16_on_cuda_matches_the_eager_expert_loop(kind, PinnedToCPU, rel_error):
    """bf16, training's dtype: where torch's grouped GEMM runs (sm >= 8.0 in transformers' rule), it
    takes our fake-quantized weights as the eager loop does. Same device, so the router's choices are
    identical; the expert matmuls round differently in bf16 (2**-8 relative per op)."""
    check_moe_grouped_bf16(kind, "cuda", PinnedToCPU=PinnedToCPU, rel_error=rel_error)


def check_moe_grouped_bf16(kind: str, device: str, *, PinnedToCPU, rel_error) -> None:
    loop = moe_case(kind, "eager", device, torch.bfloat16, PinnedToCPU=PinnedToCPU)
    grouped = moe_case(kind, "grouped_mm", device, torch.bfloat16, PinnedToCPU=PinnedToCPU)
    for k in loop:
        if k.startswith(("wq.", "mask.")):
            assert torch.equal(grouped[k], loop[k]), k
    assert rel_error(grouped["logits"], loop["logits"]) < 2e-2
    for k in loop:
        if k.startswith("grad."):
            assert rel_error(grouped[k], loop[k]) < 5e-2, k
