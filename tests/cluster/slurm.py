"""A real one-node SLURM on 127.0.0.1 for the cluster tests: munged, slurmctld and slurmd from Debian's packages
(`apt-get install slurm-wlm munge`; `.ci/run` installs them), each started in the foreground by this module and
stopped by its PID.

The configuration is the smallest that schedules real jobs on a machine without cgroups or accounting:
`ProctrackType=proctrack/linuxproc`, `TaskPlugin=task/none`, no accounting database, one node (what `slurmd -C`
reports, so it fits the machine) in two partitions: `cpu` (the default) and `gpu`, where the node has one GPU
gres backed by `/dev/null`, so scripts written for GPU nodes can be submitted (SLURM sets CUDA_VISIBLE_DEVICES and
SLURM_GPUS_ON_NODE; torch finds no device and trains on the CPU). Everything (munge key and socket, state, spool,
logs, ports) is private to one directory, so it never touches a system SLURM or munge.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing() -> str | None:
    """Why a SLURM cannot be started here, or None."""
    for tool in (*DAEMONS, "sbatch", "squeue", "scontrol"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Slurm:
    """A running one-node SLURM; `env()` is what a client (sbatch, squeue, submitit) needs."""

    root: Path
    node: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, check=check, timeout=timeout)

    # -- start and stop -------------------------------------------------------------------------------------------
    def start(self) -> None:
        for sub in ("etc", "munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root / sub, 0o700)
        os.chmod(self.root, 0o755)  # jobs (root) read the config; munged refuses group/world-writable folders
        self._start_munge()
        self._write_conf()
        self.procs["slurmctld"] = self._spawn("slurmctld", [_tool("slurmctld"), "-D", "-f", str(self.conf)])
        self.procs["slurmd"] = self._spawn("slurmd", [_tool("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait_idle()

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (lives as long as the daemon)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        munge = self.root / "munge"
        self.procs["munged"] = self._spawn("munged", [
            _tool("munged"), "--foreground", "--force", f"--socket={munge / 'munge.socket'}", f"--key-file={key}",
            f"--pid-file={munge / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}", "--num-threads=2"])
        self._wait(lambda: (munge / "munge.socket").exists(), "munged", 20)

    def _write_conf(self) -> None:
        detected = subprocess.run([_tool("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        node_line = next(line for line in detected.splitlines() if line.startswith("NodeName="))
        # named localhost, so that jobs reaching "the first node of the job" by name (torchrun's rendezvous in
        # launch/slurm.sbatch) never depend on the machine's host name resolving
        self.node = "localhost"
        node_line = re.sub(r"^NodeName=\S+", f"NodeName={self.node}", node_line)
        # leave the machine some memory; SLURM counts MB
        node_line = re.sub(r"RealMemory=(\d+)", lambda m: f"RealMemory={max(512, int(m.group(1)) * 3 // 4)}",
                           node_line)
        user = pwd.getpwuid(os.geteuid()).pw_name
        host = socket.gethostname().split(".")[0]
        state, spool, log = self.root / "state", self.root / "spool", self.root / "log"
        self.conf.write_text(f"""ClusterName=segplat-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.root / 'munge' / 'munge.socket'}
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
GresTypes=gpu
KillWait=5
MinJobAge=600
InactiveLimit=0
{node_line} NodeAddr=127.0.0.1 Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={self.node} MaxTime=INFINITE State=UP
""")
        (self.conf.parent / "gres.conf").write_text(f"NodeName={self.node} Name=gpu File=/dev/null\n")

    def _wait(self, ready, what: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            dead = [name for name, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start ({', '.join(dead) or 'timeout'}): {self.logs()}")
            time.sleep(0.2)

    def _wait_idle(self) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            return out.returncode == 0 and "idle" in out.stdout

        self._wait(idle, "the SLURM node", 60)

    def logs(self, tail: int = 1500) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons by PID (slurmd, slurmctld, munged)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--quiet", "-u", pwd.getpwuid(os.geteuid()).pw_name, check=False)
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    # -- jobs -----------------------------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Submit; the job gets `env` (sbatch exports the environment it is called with)."""
        out = subprocess.run(["sbatch", "--parsable", *args], env={**(env or os.environ), "SLURM_CONF": str(self.conf)},
                             capture_output=True, text=True, cwd=cwd, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} was refused: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} once SLURM has forgotten it."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if out.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for line in out.stdout.splitlines()[:1]:
            for item in line.split():
                if "=" in item:
                    key, value = item.split("=", 1)
                    fields[key] = value
        return fields

    def requeue(self, job_id: int | str, timeout: float = 60) -> None:
        """`scontrol requeue` (as a preemption or a node failure would), then release the job at once: SLURM holds a
        requeued job for two minutes (BeginTime) before it may start again."""
        self.run("scontrol", "requeue", str(job_id))
        deadline = time.monotonic() + timeout
        while self.job(job_id).get("JobState") != "PENDING":
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} was not requeued: {self.job(job_id)}")
            time.sleep(0.2)
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    def jobs(self) -> list[str]:
        """Job ids that SLURM still holds pending or running."""
        out = self.run("squeue", "-h", "-o", "%i %T", check=False)
        return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]

    def wait(self, job_id: int | str, timeout: float = 300, states: tuple[str, ...] = ("COMPLETED",)) -> dict:
        """Wait until the job reaches a final state; returns its fields (the state must be one of `states`)."""
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                 "BOOT_FAIL", "DEADLINE")
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in final:
                if state not in states:
                    raise AssertionError(f"job {job_id} ended {state}: {info}")
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state or 'unknown'} after {timeout} s")
            time.sleep(0.5)
