"""The convert -> evaluate pipeline that compare and the sweep report share (eval/pipeline.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_report_simulates_a_scheme_without_real_kernels(world, tmp_path, base_overrides, env, run_train):
    """A CPU has no real kernels for float8 (the bf16 run's PTQ) or for torchao's GPU int4 (the QAT
    run): both are exported simulated, evaluated as the fake-quantized forward, and labelled."""
    sweep_dir = tmp_path / "sim"
    runs = []
    for i, extra in enumerate([["qat.enabled=false"], ["qat.enabled=true", "qat.scheme=int4-weight-only"]]):
        run_dir = sweep_dir / f"run-{i:03d}"
        run_train(base_overrides(world, run_dir) + extra + ["training.steps=2"], 1)
        runs.append({"index": i, "overrides": extra, "dir": str(run_dir)})
    # convert by hand refuses without --simulate, in one line that names the way out
    p = subprocess.run([sys.executable, str(ROOT / "recipes/convert.py"), "--checkpoint", runs[1]["dir"],
                        "--out", str(tmp_path / "refused")], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=600)
    err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and "--simulate" in err[0], p.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
    # a run killed before its last step: checkpoints but no done.json, so the report skips it
    unfinished = sweep_dir / "run-002"
    shutil.copytree(sweep_dir / "run-000", unfinished)
    (unfinished / "done.json").unlink()
    runs.append({"index": 2, "overrides": ["qat.enabled=false"], "dir": str(unfinished)})
    (sweep_dir / "sweep.json").write_text(json.dumps({"name": "sim", "config": "configs/tiny/full.yaml",
                                                       "grid": [], "set": [], "runs": runs}))
    proc = subprocess.run([sys.executable, str(ROOT / "slurm/sweep_report.py"), str(sweep_dir), "--ptq-scheme", "float8",
                           "--tasks", "local", "--data-dir", str(world / "eval"), "--limit", "4", "--dtype", "float32"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "run-002: training did not finish, skipped" in proc.stdout
    rows = json.loads((sweep_dir / "sweep_results.json").read_text())
    evaluated = sorted((Path(r["run"]).name, r["model"], r.get("simulated")) for r in rows if r["model"] != "train")
    assert evaluated == [("run-000", "bf16", False), ("run-000", "ptq", True), ("run-001", "qat", True)]
    # each row holds the numbers of its model's own evaluation record
    for r in rows:
        if r["model"] != "train":
            record = json.loads((Path(r["run"]) / "eval" / f"{r['model']}.json").read_text())["results"]
            assert r["eval/wikitext/bits_per_byte"] == record["wikitext"]["bits_per_byte"] > 0, r
            assert r["eval/hellaswag/acc"] == record["hellaswag"]["acc"], r
    table = (sweep_dir / "sweep_report.md").read_text()
    assert "| ptq (simulated) |" in table and "| qat (simulated) |" in table and "| bf16 |" in table
    for run, kind in [("run-000", "ptq"), ("run-001", "qat")]:
        export = sweep_dir / run / "export" / "final"
        verify = json.loads((export / "verify.json").read_text())
        assert verify["mode"] == "simulated" and not (export / "quantized").exists()
        record = json.loads((sweep_dir / run / "eval" / f"{kind}.json").read_text())
        assert record["simulated"] is True
        assert record["scheme"]["scheme"] == {"ptq": "float8", "qat": "int4-weight-only"}[kind]
    # the QAT run's simulated model is exactly its training forward
    assert json.loads((sweep_dir / "run-001" / "export" / "final" / "verify.json").read_text())[
        "simulated_equals_training_forward"] is True
