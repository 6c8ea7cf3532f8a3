"""A real Slurm cluster on this machine for tests: munged + slurmctld + two emulated slurmd nodes.

Everything lives in a temp directory with its own ports and munge socket, so it never touches a
Slurm that may already run on the box. ``LocalSlurm.start()`` waits until both nodes are idle;
``stop()`` kills exactly the daemons it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "munged", "scontrol")


def available() -> bool:
    return all(shutil.which(b) or os.path.exists(f"/usr/sbin/{b}") for b in BINARIES)


def _free_ports(n: int) -> list[int]:
    """n free TCP ports, consecutive (slurmd ports of emulated nodes are given as a range)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free consecutive ports")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """Two emulated nodes ``n1``, ``n2`` (8 CPUs each, whatever the machine has) in partition ``debug``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: list[subprocess.Popen] = []
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.conf = self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _munge(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged (user munge) must reach its socket directory
        d = self.root / "munge"
        d.mkdir(parents=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        shutil.chown(d, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        self.procs.append(subprocess.Popen(
            ["runuser", "-u", "munge", "--", _sbin("munged"), "--foreground", "--force",
             f"--socket={self.munge_socket}", f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
             f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        ))
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if time.monotonic() > deadline or self.procs[-1].poll() is not None:
                raise RuntimeError(f"munged did not start: {(d / 'munged.log').read_text() if (d / 'munged.log').exists() else ''}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        ctld_port, d1, d2 = _free_ports(3)
        host = socket.gethostname().split(".")[0]
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir(exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=ringrt-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d1}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{d1}-{d2}] CPUs=8 RealMemory=4096 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        self._munge()
        self._write_conf()
        env = self.env
        log = open(self.root / "log" / "daemons.out", "ab")
        self.procs.append(subprocess.Popen([_sbin("slurmctld"), "-D", "-i"], env=env, stdout=log, stderr=log, start_new_session=True))
        for n in ("n1", "n2"):
            (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)
            self.procs.append(subprocess.Popen([_sbin("slurmd"), "-D", "-N", n], env=env, stdout=log, stderr=log, start_new_session=True))
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if states.get("n1") == "idle" and states.get("n2") == "idle":
                return self
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError(f"Slurm did not come up (sinfo: {out.stdout!r} {out.stderr!r}); logs in {self.root}/log")
            time.sleep(0.5)

    def sbatch_wait(self, args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        """Start ``sbatch --wait`` (it ends when the job ends, with the job's exit code).

        Returns at once so several jobs can run together: sbatch polls the job with growing
        intervals, so jobs waited for one after another cost tens of seconds each.
        """
        return subprocess.Popen(["sbatch", "--wait", *args], env={**self.env, **(extra_env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _drain(self, timeout: float = 30.0) -> None:
        """Let finished jobs' steps wind down (cancel what is left) before the daemons go."""
        deadline, cancelled = time.monotonic() + timeout, False
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                return
            if not cancelled and time.monotonic() > deadline - timeout / 2:
                subprocess.run(["scancel", "--full", *out.stdout.split()], env=self.env, capture_output=True)
                cancelled = True
            time.sleep(0.5)

    def _kill_job_processes(self) -> None:
        """Kill any process still running for this cluster's jobs (found by its SLURM_CONF)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if marker in f.read().split(b"\0") and int(pid) != os.getpid():
                        os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                continue

    def stop(self) -> None:
        if self.conf.exists() and self.procs:
            self._drain()
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        self.procs.clear()
        self._kill_job_processes()
