"""A real single-node Slurm cluster for the tests (Debian's slurmctld/slurmd + munge, no systemd).

Started once per test session; only the daemons started here are stopped at teardown (by pid
file), and every job of this cluster is cancelled. Two facts of such a cluster matter here:
cred_expire=5 lets a requeued job restart within seconds; sacct is unavailable (no slurmdbd),
so jobs are followed with `scontrol show job` and `squeue --states=all`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def _node_line() -> str:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("NodeName="))
    # keep the hardware description, drop UpTime and pin the address to loopback
    line = re.sub(r"\s*UpTime=\S+", "", line)
    mem = int(re.search(r"RealMemory=(\d+)", line).group(1))
    return re.sub(r"RealMemory=\d+", f"RealMemory={max(1000, mem - 1024)}", line) + " NodeAddr=127.0.0.1"


def write_conf(root: Path, free_port) -> Path:
    node = _node_line()
    name = re.search(r"NodeName=(\S+)", node).group(1)
    for d in ("state", "spool", "log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=qattest
SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
MinJobAge=600
{node}
PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def start_munge() -> bool:
    """Start munged unless one runs; True when we started it (and must stop it)."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return False
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create"], check=True)
        shutil.chown(key, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    return True


class Cluster:
    def __init__(self, root: Path, free_port):
        self.root = Path(root)
        self.conf = write_conf(self.root, free_port)
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.started_munge = False

    def start(self) -> "Cluster":
        self.started_munge = start_munge()
        subprocess.run(["slurmctld", "-f", str(self.conf), "-i"], check=True, env=self.env)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"slurm node did not come up: {self.run('sinfo', check=False).stdout}\n"
                           f"{(self.root / 'log/slurmctld.log').read_text()[-2000:]}")

    def run(self, *cmd, check=True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, check=check, **kw)

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        jobs = [dict(kv.split("=", 1) for kv in l.split() if "=" in kv) for l in out.splitlines() if l.strip()]
        return jobs[0] if jobs else {}

    def array_states(self, job_id: str) -> list[str]:
        out = self.run("squeue", "--states=all", "-h", "-j", str(job_id), "-o", "%T", check=False).stdout
        return out.split()

    def wait(self, job_id: str, timeout: float = 600, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout}s")

    def stop(self) -> None:
        self.run("scancel", "--full", "-u", os.environ.get("USER", "root"), check=False)
        time.sleep(1)
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            f = self.root / pid_file
            if f.exists():
                try:
                    os.kill(int(f.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
        if self.started_munge:
            subprocess.run(["pkill", "-x", "munged"], check=False)
