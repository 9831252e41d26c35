"""Benchmark the data path at growing corpus sizes: time to the first step, peak RSS, build tokens/s.

    python bench/bench_data.py --world assets/world --sizes 1,4,16,64 --old-tree /tmp/old --out runs/bench-data

For each size (a multiple of the world's pretraining text, written once as one .jsonl) it runs
the real `torchrun --nproc_per_node 2 recipes/train.py` for one step on the tiny model, three ways:
- new, first launch: an empty cache, so the node's builder tokenizes (data.num_proc processes);
- new, second launch: the same command again, a cache hit;
- old: the same command in `--old-tree`, a checkout of the commit before the cache
  (`git worktree add /tmp/old edbfdc7`), which tokenizes on every rank, every launch.

Reported per launch:
- first step s: from the launch to the first line of metrics.jsonl (so it excludes the final
  checkpoint save);
- rank RSS GB: the largest peak RSS (VmHWM) of the two rank processes;
- worker RSS GB: the largest peak of the other processes under the ranks (the tokenizer
  workers that datasets.map forks);
- build tok/s: the builder's tokens/s, parsed from its log line;
- 1-proc tok/s: the fast tokenizer alone, in one process, on the 1x text, measured just before
  the size's first launch. On a shared machine this is the yardstick for the build's rate.
Peaks are sampled from /proc every 50 ms; VmHWM is monotonic, so the last sample of a process
is its peak unless it grows in the last 50 ms of its life.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def corpus(world: Path, times: int, out: Path) -> tuple[Path, int]:
    path = out / f"corpus-{times}x.jsonl"
    text = (world / "data" / "pretrain.jsonl").read_text()
    if not path.exists():
        with open(path, "w") as f:
            for _ in range(times):
                f.write(text)
    return path, path.stat().st_size


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def launch(tree: Path, world: Path, data: Path, run_dir: Path, cache: Path, num_proc: int) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [f"output_dir={run_dir}", f"model.path={world}/model",
                 f"data.sources=[{{path: {data}, kind: text}}]", "training.steps=1", "training.batch_size=1",
                 "logging.progress_bar=false", "logging.wandb.enabled=false", "checkpoint.every_n_steps=0"]
    if (tree / "qat" / "data").is_dir():  # the new path's own keys
        overrides += [f"data.cache_dir={cache}", f"data.num_proc={num_proc}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(tree / "recipes" / "train.py"), "--config", str(tree / "configs" / "tiny" / "full.yaml"), *overrides]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, tuple[bool, int]] = {}
    first_step = None
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            hwm = vm_hwm_kb(pid)
            if hwm:
                peaks[pid] = (peaks.get(pid, (parent(pid) == proc.pid, 0))[0], hwm)  # ranks: torchrun's children
        if first_step is None and metrics.exists() and metrics.read_text().strip():
            first_step = time.perf_counter() - t0
        time.sleep(0.05)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"launch failed ({proc.returncode}):\n{log[-3000:]}")
    built = re.findall(r"\(([\d,]+) tokens/s\)", log)
    ranks = [kb for rank, kb in peaks.values() if rank]
    others = [kb for rank, kb in peaks.values() if not rank]
    return {"first_step_s": round(first_step or float("nan"), 1), "rank_rss_gb": round(max(ranks) / 2**20, 2),
            "worker_rss_gb": round(max(others, default=0) / 2**20, 2),
            "build_tok_s": int(built[-1].replace(",", "")) if built else None,
            "cache_hit": "cache hit" in log, "num_ranks_seen": len(ranks)}


def tokenizer_alone(world: Path) -> int:
    """Tokens/s of the bare fast tokenizer in one process (best of two passes over the 1x text)."""
    code = ("import json,sys,time\nfrom transformers import AutoTokenizer\n"
            "tok=AutoTokenizer.from_pretrained(sys.argv[1]+'/model')\n"
            "texts=[json.loads(l)['text'] for l in open(sys.argv[1]+'/data/pretrain.jsonl')]\nbest=0\n"
            "for _ in range(2):\n t=time.perf_counter(); n=sum(map(len,tok(texts)['input_ids']))\n"
            " best=max(best,n/(time.perf_counter()-t))\nprint(int(best))\n")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return int(subprocess.run([sys.executable, "-c", code, str(world)], env=env, capture_output=True, text=True,
                              check=True).stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=str(ROOT / "assets" / "world"))
    p.add_argument("--sizes", default="1,4,16,64")
    p.add_argument("--old-tree", default=None, help="checkout of the commit before the cache (edbfdc7)")
    p.add_argument("--old-max", type=int, default=16, help="largest size for the old path (64x needs ~10 GB/rank)")
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-data"))
    a = p.parse_args()
    out, world = Path(a.out), Path(a.world).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for times in [int(s) for s in a.sizes.split(",")]:
        data, size = corpus(world, times, out)
        cache = out / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        row = {"size": f"{times}x", "mb": round(size / 1e6, 1), "one_proc_tok_s": tokenizer_alone(world)}
        row["new_first"] = launch(ROOT, world, data, out / "run", cache, a.num_proc)
        row["new_second"] = launch(ROOT, world, data, out / "run", cache, a.num_proc)
        tokens = json.loads(next(cache.glob("*/manifest.json")).read_text())["num_tokens"]
        row["tokens"] = tokens
        if a.old_tree and times <= a.old_max:
            row["old"] = launch(Path(a.old_tree), world, data, out / "run-old", cache, a.num_proc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "bench_data.json").write_text(json.dumps(rows, indent=1))
    print("\n| corpus | tokens | new: first launch s | build tok/s | new: cache hit s | new rank RSS GB "
          "(first / hit) | build worker RSS GB | old: first step s | old rank RSS GB | 1-proc tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        f, s, o = r["new_first"], r["new_second"], r.get("old")
        old = f"{o['first_step_s']} | {o['rank_rss_gb']}" if o else "not run | not run"
        print(f"| {r['size']} ({r['mb']} MB) | {r['tokens'] / 1e6:.1f} M | {f['first_step_s']} | "
              f"{f['build_tok_s']:,} | {s['first_step_s']} | {f['rank_rss_gb']} / {s['rank_rss_gb']} | "
              f"{f['worker_rss_gb']} | {old} | {r['one_proc_tok_s']:,} |")


if __name__ == "__main__":
    main()
