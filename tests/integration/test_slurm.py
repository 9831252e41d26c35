"""Slurm on a real single-node cluster: a sweep with its dependent comparison, a requeue that
resumes exactly, train.sbatch running torchrun (2 processes) through srun, and convert.sbatch
running a sharded convert."""

from pathlib import Path
import json
import subprocess
import sys
import time

import pytest

from slurm_cluster import Cluster, missing_binaries

pytestmark = pytest.mark.slow  # an end-to-end pipeline: `make test-slow` (CI runs it)

ROOT = Path(__file__).resolve().parents[2]

NO_GPU = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=20"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, free_port):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed here (missing {', '.join(missing)}); .ci/run installs "
                    f"slurmctld slurmd slurm-client munge with apt-get")
    c = Cluster(tmp_path_factory.mktemp("slurm"), free_port).start()
    yield c
    c.stop()


def job_env(cluster, *, env, **extra):
    e = {**env(), "SLURM_CONF": str(cluster.conf), "GPUS_PER_NODE": "2", "PY": sys.executable, **extra}
    e.pop("WANDB_MODE", None)  # offline by default: no key is configured
    e["NETRC"] = "/nonexistent"
    return e


def sweep(cluster, *args, check=True, env):
    proc = subprocess.run([sys.executable, str(ROOT / "slurm/sweep.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, env=job_env(cluster, env=env))
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def set_args(world, out, *, base_overrides):
    keep = [o for o in base_overrides(world, out) if not o.startswith(("output_dir=", "logging.wandb"))]
    return [f"--set={o}" for o in keep + ["logging.wandb.enabled=true"]]


def test_sweep_with_dependent_comparison(cluster, world, tmp_path, wandb_records, base_overrides, env):
    proc = sweep(cluster, "--name", "s2", "--config", "configs/tiny/full.yaml", "--out", str(tmp_path),
                 "--grid", "optimizer.lr=1e-3,3e-3", *set_args(world, tmp_path, base_overrides=base_overrides), "--set=training.steps=4",
                 *[f"--sbatch={a}" for a in NO_GPU], *[f"--compare-sbatch={a}" for a in NO_GPU],
                 "--eval-args", "--tasks", "local", "--data-dir", str(world / "eval"), "--limit", "8",
                 "--dtype", "float32", env=env)
    array, compare = proc.stdout.strip().splitlines()[-1].split("array job ")[1].split(", comparison job ")
    info = cluster.wait(compare, timeout=900)
    sweep_dir = tmp_path / "s2"
    assert info["JobState"] == "COMPLETED", (info, _tail(sweep_dir))
    rows = json.loads((sweep_dir / "sweep_results.json").read_text())
    assert sorted((r["params"]["optimizer.lr"], r["model"]) for r in rows) == [
        ("1e-3", "bf16"), ("1e-3", "ptq"), ("3e-3", "bf16"), ("3e-3", "ptq")]
    assert all(r["status"] == "done" and "eval/wikitext/bits_per_byte" in r for r in rows)
    # W&B: every training and eval run of the sweep is offline, in the sweep's group
    groups = set()
    for f in sweep_dir.rglob("run-*.wandb"):
        for rec in wandb_records(f):
            if rec.WhichOneof("record_type") == "run":
                groups.add(rec.run.run_group)
    assert groups == {"s2"}
    assert len(list(sweep_dir.rglob("offline-run-*"))) >= 2 + 4 + 1  # 2 train, 4 eval, 1 comparison
    summary = subprocess.run([sys.executable, str(ROOT / "slurm/summarize.py"), str(sweep_dir)], cwd=ROOT,
                             capture_output=True, text=True, env=env(), check=True).stdout
    assert summary.count("| run-00") == 4 and "sorted by eval/wikitext/bits_per_byte" in summary


def _tail(d):
    return "\n".join(f.read_text()[-1500:] for f in sorted(d.glob("slurm-*.out")))


def test_requeued_job_resumes_with_identical_losses(cluster, world, straight_b2_losses, tmp_path, base_overrides, env, long_b2_args, losses):
    cut = tmp_path / "cut"
    out_file = tmp_path / "job.out"
    sub = cluster.run("sbatch", "--parsable", *NO_GPU, f"--output={out_file}", f"--chdir={ROOT}",
                      str(ROOT / "slurm/train.sbatch"), "--config", str(ROOT / "configs/tiny/full.yaml"),
                      *base_overrides(world, cut), *long_b2_args, env=job_env(cluster, env=env, REPO=str(ROOT)))
    job = sub.stdout.strip()
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert time.time() < deadline, out_file.read_text()[-3000:] if out_file.exists() else "no output"
        time.sleep(0.3)
    # what Slurm does ahead of a time limit with --signal=B:USR1@N, delivered now
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = cluster.wait(job, timeout=600, states=("COMPLETED", "FAILED", "CANCELLED"))
    log = out_file.read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info.get("Restarts") == "1", info
    assert "stop requested: checkpoint at step" in log and "SLURM_RESTART_COUNT=1" in log
    assert "job %s restart 1" % job in log
    first = log.split("stop requested: checkpoint at step ")[1].split(" saved")[0]
    assert 3 <= int(first) < 30
    # train.sbatch ran torchrun through srun with 2 processes: two DCP shards per checkpoint
    assert len(list((cut / "checkpoints" / "step-000030").glob("*.distcp"))) == 2
    assert losses(cut) == straight_b2_losses


def test_submit_time_errors(cluster, world, tmp_path, base_overrides, env):
    base = ["--name", "bad", "--config", "configs/tiny/full.yaml", "--out", str(tmp_path)]
    cases = [
        (["--grid", "optimizer.lrr=1,2"], "unknown config key 'optimizer.lrr'"),
        ([], "the sweep is empty"),
        (["--grid", "optimizer.lr="], "--grid optimizer.lr: no values"),
        (["--grid", "optimizer.lr=1e-3", "--sbatch=--partition=nope", *[f"--sbatch={a}" for a in NO_GPU]],
         "sbatch rejected the job: sbatch: error: invalid partition specified: nope"),
    ]
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("optimizer.lr=1e-3\ntraining.steps='4\n")
    cases.append((["--list", str(bad_list)], "bad.txt:2: does not parse"))
    for extra, needle in cases:
        proc = sweep(cluster, *base, *set_args(world, tmp_path, base_overrides=base_overrides), *extra, check=False, env=env)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and err and needle in err[-1], (extra, proc.stderr[-1500:])
    assert cluster.run("squeue", "-h", "-n", "bad").stdout.strip() == ""


def test_dry_run_submits_nothing(cluster, world, tmp_path, base_overrides, env):
    proc = sweep(cluster, "--name", "dry", "--config", "configs/tiny/full.yaml", "--out", str(tmp_path),
                 "--grid", "qat.scheme=8da4w,8da2w", "--grid", "optimizer.lr=1e-3,2e-3", *set_args(world, tmp_path, base_overrides=base_overrides),
                 "--dry-run", env=env)
    assert proc.stdout.count("\n[") == 3 and "--array=0-3" in proc.stdout and "<dry-run>" in proc.stdout
    assert not (tmp_path / "dry").exists()


def test_convert_sbatch_runs_a_sharded_convert(cluster, world, tmp_path, base_overrides, env, run_train, assert_same_export, convert_cli):
    """convert.sbatch: srun -> torchrun -> 2 ranks, each with one decoder block; the folders equal a
    single-process convert bit for bit."""


    run_train(base_overrides(world, tmp_path / "run") + ["training.steps=2", "qat.enabled=true",
                                                        "qat.scheme=8da4w", "qat.group_size=32"], 1)
    out_file = tmp_path / "job.out"
    sub = cluster.run("sbatch", "--parsable", *NO_GPU, f"--output={out_file}", f"--chdir={ROOT}",
                      str(ROOT / "slurm/convert.sbatch"), "--checkpoint", str(tmp_path / "run"),
                      "--out", str(tmp_path / "sharded"), env=job_env(cluster, env=env, REPO=str(ROOT), PROCS_PER_NODE="2"))
    convert_cli(["--checkpoint", tmp_path / "run", "--out", tmp_path / "local"])
    info = cluster.wait(sub.stdout.strip(), timeout=600)
    assert info["JobState"] == "COMPLETED", out_file.read_text()[-3000:]
    assert "1 node(s) x 2 ranks" in out_file.read_text()
    assert_same_export(tmp_path / "local", tmp_path / "sharded", world)
