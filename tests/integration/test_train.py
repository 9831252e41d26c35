"""The real training entry point under torchrun (gloo, fp32, world sizes 1 and 2)."""

import shutil

import pytest
import torch


LEARNED_DELAYED = ["qat.fake_quant_after_n_steps=4", "qat.learn_scales=true"]


def grad_norms(run_dir, *, read_metrics):
    return [m["train/grad_norm"] for m in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def parity_runs(world, tmp_path_factory, base_overrides, run_train):
    """Same 5 full fine-tuning steps three ways: 1 rank x 8, 2 ranks x 4, 2 ranks x 2 x accumulation 2.

    Parity is checked without fake quantization: with 2-bit weights, a 1e-7 difference from
    the order of a floating-point reduction can flip a rounding decision and move the loss by
    1e-4, which says nothing about the recipe. QAT under FSDP2 is checked by the forward test.
    """
    root = tmp_path_factory.mktemp("parity")
    shapes = {"w1b8": (1, 8, 1), "w2b4": (2, 4, 1), "w2b2a2": (2, 2, 2)}
    out = {}
    for name, (nproc, bs, accum) in shapes.items():
        d = root / name
        run_train(base_overrides(world, d) + [
            "training.steps=5", f"training.batch_size={bs}", f"training.gradient_accumulation_steps={accum}",
            "checkpoint.every_n_steps=3", "checkpoint.keep_last=3"], nproc)
        out[name] = d
    return out


def final_model(run_dir, step, *, load_checkpoint_tensors):
    return load_checkpoint_tensors(run_dir / "checkpoints" / f"step-{step:06d}")["model"]


# Parity tolerance: world 2 sums the gradients in another order (reduce-scatter), a rounding of
# ~1e-7 in fp32 that 5 Adam steps carry. Measured: losses 1.1e-7, grad norms 2.8e-7, weights at
# most 4.3e-7 relative; accumulation 1.5e-7, a resume at another world size 1.3e-7. 1e-5 leaves
# room for another CPU's BLAS; a loss-scaling mistake (a factor of 2 or of the world size) moves
# the grad norms by that factor.
PARITY = 1e-5


def test_fsdp2_world_2_matches_single_process_on_the_combined_batch(parity_runs, load_checkpoint_tensors, losses, read_metrics, rel_close):
    a, b = parity_runs["w1b8"], parity_runs["w2b4"]
    la, lb = losses(a), losses(b)
    assert len(la) == 5 and la[-1] < la[0]
    assert rel_close(lb, la, PARITY), (la, lb)
    assert rel_close(grad_norms(b, read_metrics=read_metrics), grad_norms(a, read_metrics=read_metrics), PARITY)  # catches loss-scaling mistakes Adam would hide
    pa, pb = final_model(a, 5, load_checkpoint_tensors=load_checkpoint_tensors), final_model(b, 5, load_checkpoint_tensors=load_checkpoint_tensors)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert rel_close(pb[k], pa[k], PARITY), k


def test_gradient_accumulation_equals_the_larger_micro_batch(parity_runs, load_checkpoint_tensors, losses, read_metrics, rel_close):
    b, c = parity_runs["w2b4"], parity_runs["w2b2a2"]
    assert rel_close(losses(c), losses(b), PARITY)
    assert rel_close(grad_norms(c, read_metrics=read_metrics), grad_norms(b, read_metrics=read_metrics), PARITY)
    pb, pc = final_model(b, 5, load_checkpoint_tensors=load_checkpoint_tensors), final_model(c, 5, load_checkpoint_tensors=load_checkpoint_tensors)
    for k in pb:
        assert rel_close(pc[k], pb[k], PARITY), k


@pytest.mark.parametrize("src, dst, nproc", [("w2b4", "w1", 1), ("w1b8", "w2", 2)])
def test_checkpoint_resumes_at_another_world_size(world, parity_runs, tmp_path, src, dst, nproc, base_overrides, load_checkpoint_tensors, losses, rel_close, run_train):
    other = tmp_path / dst
    (other / "checkpoints").mkdir(parents=True)
    shutil.copytree(parity_runs[src] / "checkpoints" / "step-000003", other / "checkpoints" / "step-000003")
    bs = 8 // nproc
    run_train(base_overrides(world, other) + ["training.steps=5", f"training.batch_size={bs}",
                                              "checkpoint.resume=auto"], nproc)
    assert rel_close(losses(other), losses(parity_runs[src])[3:], PARITY)
    ref, got = final_model(parity_runs[src], 5, load_checkpoint_tensors=load_checkpoint_tensors), final_model(other, 5, load_checkpoint_tensors=load_checkpoint_tensors)
    for k in ref:
        assert rel_close(got[k], ref[k], PARITY), k


def test_fake_quantized_forward_under_fsdp2_equals_the_unsharded_one(world, tmp_path, base_overrides, losses, qat_args, run_train, logits):
    """Step 1's loss under FSDP2 (2 ranks) equals the loss of the plain module on that batch."""
    run_train(base_overrides(world, tmp_path) + qat_args + ["training.steps=1"], 2)
    import torch.nn.functional as F

    from qat.config import load_config
    from qat.data import IGNORE, StepSampler, build_dataset
    from qat.model import apply_qat, load_model
    from qat.schemes import get_scheme
    from transformers import AutoTokenizer

    cfg = load_config("configs/tiny/full.yaml", base_overrides(world, tmp_path) + qat_args)
    data = build_dataset(cfg.data, AutoTokenizer.from_pretrained(cfg.model.path))
    idx = StepSampler(len(data), 8, cfg.training.seed, True).next_step()
    model = load_model(cfg.model)
    apply_qat(model, cfg.qat, get_scheme("8da2w"))
    ids, labels, pos = data.batch(idx)
    with torch.no_grad():
        logits = model(ids, position_ids=pos, use_cache=False).logits  # a cache disables packed masks
    lab = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), lab.flatten(), ignore_index=IGNORE, reduction="sum")
    expected = float(loss) / int((lab != IGNORE).sum())
    # measured 4.2e-8 relative: FSDP2 sums the two ranks' token losses in another order than one
    # cross_entropy over the batch; a wrongly quantized shard moves it by more than 1e-3
    assert abs(losses(tmp_path)[0] - expected) <= 1e-6 * expected


@pytest.fixture(scope="module")
def full_qat_resume(world, tmp_path_factory, base_overrides, losses, qat_args, run_train):
    """6 steps straight, versus 3 steps + stop + resume; the fake-quant delay (4) crosses the stop.
    The scales are learned: they start from the weights at step 4, after the resume."""
    root = tmp_path_factory.mktemp("resume")
    args = qat_args + LEARNED_DELAYED
    straight, split = root / "straight", root / "split"
    run_train(base_overrides(world, straight) + args, 2)
    run_train(base_overrides(world, split) + args + ["training.stop_after_steps=3"], 2)
    first_half = losses(split)
    unfinished = not (split / "done.json").exists()  # stop_after_steps ends early: not finished
    run_train(base_overrides(world, split) + args + ["checkpoint.resume=auto"], 2)
    return straight, split, (first_half, unfinished)


def test_resume_is_bitwise_identical_with_fake_quant_delay_across_it(full_qat_resume, load_checkpoint_tensors, losses, read_metrics):
    straight, split, (first_half, unfinished) = full_qat_resume
    assert len(first_half) == 3 and unfinished
    assert losses(split) == losses(straight)  # exact float equality, all 6 steps
    flags = [m["qat/fake_quant_enabled"] for m in read_metrics(split)]
    assert flags == [0, 0, 0, 0, 1, 1]
    ps, pt = final_model(split, 6, load_checkpoint_tensors=load_checkpoint_tensors), final_model(straight, 6, load_checkpoint_tensors=load_checkpoint_tensors)
    assert all(torch.equal(ps[k], pt[k]) for k in pt)
    scales = [k for k in pt if k.endswith("weight_scale")]
    assert len(scales) == 14 and all(k.replace("weight_scale", "weight") in pt for k in scales)


def test_rank0_broadcast_init_equals_loading_on_every_rank(world, full_qat_resume, tmp_path, base_overrides, load_checkpoint_tensors, losses, qat_args, run_train):
    """fsdp.init_from_rank0 (default): rank 1 built on meta and filled by broadcast trains exactly
    like a rank that loaded the weights itself."""
    straight, _, _ = full_qat_resume
    run_train(base_overrides(world, tmp_path) + qat_args + LEARNED_DELAYED + ["fsdp.init_from_rank0=false"], 2)
    assert losses(tmp_path) == losses(straight)
    ps, pt = final_model(tmp_path, 6, load_checkpoint_tensors=load_checkpoint_tensors), final_model(straight, 6, load_checkpoint_tensors=load_checkpoint_tensors)
    assert all(torch.equal(ps[k], pt[k]) for k in pt)


def test_lora_resume_and_only_adapters_train(world, tmp_path, base_overrides, load_checkpoint_tensors, lora_args, losses, qat_args, rel_close, run_train):
    """LoRA QAT with the frozen base weights fake-quantized once when fake quantization starts
    (step 2 here; after the resume the run starts quantized): the same losses, bit for bit, as
    quantizing them in every forward; a resume at another world size continues the run."""
    straight, split, every = tmp_path / "straight", tmp_path / "split", tmp_path / "every"
    args = lora_args + qat_args + ["qat.fake_quant_after_n_steps=2"]
    once = "qat: 14 frozen weights fake-quantized once, at step"
    assert f"{once} 2 " in run_train(base_overrides(world, straight) + args, 2).stdout
    assert once not in run_train(base_overrides(world, every) + args + ["qat.quantize_frozen_once=false"], 2).stdout
    run_train(base_overrides(world, split) + args + ["training.stop_after_steps=3"], 2)
    # resume at world 1: the adapter-only checkpoint reshards like any other
    resumed = run_train(base_overrides(world, split) + args + ["checkpoint.resume=auto", "training.batch_size=8"], 1)
    assert f"{once} 3 " in resumed.stdout
    assert losses(straight)[0] > losses(straight)[-1]
    assert losses(every) == losses(straight)
    assert rel_close(losses(split), losses(straight), PARITY)
    assert losses(split)[:3] == losses(straight)[:3]
    state = load_checkpoint_tensors(straight / "checkpoints" / "step-000006")
    assert state["model"] and all(".lora_A." in k or ".lora_B." in k for k in state["model"])
    assert set(state["optim"]["state"]) == set(state["model"])
    lora_b = [v for k, v in state["model"].items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(v.abs().sum() > 0 for v in lora_b)  # every B moved from its 0 start
    every_state = load_checkpoint_tensors(every / "checkpoints" / "step-000006")["model"]
    assert all(torch.equal(every_state[k], v) for k, v in state["model"].items())


def test_checkpoints_keep_last_k_and_meta_records_the_scheme(world, tmp_path, base_overrides, losses, qat_args, run_train):
    import json

    run_train(base_overrides(world, tmp_path) + qat_args + ["checkpoint.every_n_steps=2", "checkpoint.keep_last=2",
                                                      "qat.embedding=true", "qat.embedding_bits=8"], 1)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000006"]
    meta = json.loads((tmp_path / "checkpoints" / "step-000006" / "meta.json").read_text())
    assert meta["qat"] == {"scheme": "8da2w", "family": "intx", "group_size": 32, "embedding": True,
                           "embedding_bits": 8, "embedding_group_size": 32}
    assert meta["step"] == 6 and meta["world_size"] == 1
    # the recipe's own completion record, for runs launched by hand as much as by compare/Slurm
    done = json.loads((tmp_path / "done.json").read_text())
    assert done["step"] == 6 and done["loss"] == losses(tmp_path)[-1] and done["scheme"] == meta["qat"]
    assert 0 < done["train_time_s"] and done["world_size"] == 1
    assert (tmp_path / "config.yaml").read_text().count("8da2w") == 1


def test_bf16_master_weights_store_weights_and_adamw_state_in_bf16(world, tmp_path, base_overrides, run_train,
                                                                     losses, load_checkpoint_tensors):
    """training.master_dtype=bf16: no fp32 copy anywhere, as a plain bf16 loop; it still trains."""
    run_train(base_overrides(world, tmp_path) + ["training.dtype=bf16", "training.master_dtype=bf16",
                                                 "training.steps=4", "optimizer.lr=3e-3"], 2)
    saved = load_checkpoint_tensors(tmp_path / "checkpoints/step-000004")
    weights = {k: v for k, v in saved["model"].items() if v.is_floating_point()}
    states = [t for s in saved["optim"]["state"].values() for t in s.values() if t.is_floating_point() and t.ndim]
    assert weights and {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert states and {t.dtype for t in states} == {torch.bfloat16}
    got = losses(tmp_path)
    assert len(got) == 4 and got[-1] < got[0], got
