"""``ringrt cluster up|down|status``: a real Slurm cluster on this one machine, to try the sbatch recipes.

    ringrt cluster up                # as root; prints the line to paste:
    export SLURM_CONF=/root/.cache/ringrt/slurm/slurm.conf
    sbatch --wait --nodes=2 slurm/torchrun.sbatch -m ringrt.jobs.probe --out probe.json
    ringrt cluster down

It runs munged, slurmctld and one slurmd per emulated node (``n1``, ``n2``: 8 CPUs each whatever the
machine has, so the recipes' shapes fit; the ranks share the real cores) in partition ``debug``.
Everything lives in one directory (``--dir``, default ``~/.cache/ringrt/slurm``): ``slurm.conf``,
the munge key and socket, Slurm's state and spool, the logs (``log/``) and the daemons' process ids
(``daemons.json``). Its ports are free ones picked at ``up`` and its munge socket is its own, so it
never touches a Slurm that already runs on the box. ``down`` stops exactly the daemons it recorded
(and what is left of this cluster's jobs) and keeps the directory for its logs.

Needs root (slurmd starts every job as its user, and root's home is where the default directory
is; munged runs as root too) and the ``slurm-wlm`` and ``munge`` packages (``bash .ci/apt-packages.sh``).
The tests start the same cluster in a temporary directory (``tests/slurm_local.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
DEFAULT_DIR = Path("~/.cache/ringrt/slurm")
INSTALL_HINT = "bash .ci/apt-packages.sh (in the ringrt repository, as root: apt-get install slurm-wlm munge)"
_SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 107 bytes


class ClusterError(RuntimeError):
    """Why the cluster cannot be started or stopped, in one line for the user."""


def _program(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)


def missing_programs() -> list[str]:
    """The Slurm and munge programs this machine lacks (empty when ``up`` can run)."""
    return [name for name in (*DAEMONS, *CLIENTS) if _program(name) is None]


def check_can_run() -> None:
    """Refuse, in one line that says what to do, when not root or when Slurm/munge are missing."""
    if os.geteuid() != 0:
        raise ClusterError("a one-machine Slurm cluster needs root (slurmd starts each job as its user); "
                           "run it as root: sudo ringrt cluster up")
    missing = missing_programs()
    if missing:
        raise ClusterError(f"Slurm and munge are not installed (missing: {', '.join(missing)}); install them with: "
                           f"{INSTALL_HINT}")


def _free_ports(n: int) -> list[int]:
    """n free consecutive TCP ports on 127.0.0.1 (the emulated nodes' slurmd ports are given as a range)."""
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
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ClusterError("no free consecutive ports on 127.0.0.1")


def _environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a child of ours that ended is reaped; a zombie counts as ended)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


class LocalSlurm:
    """One machine's Slurm: munged, slurmctld and ``nodes`` emulated slurmd nodes (``n1`` ...), all in ``root``.

    ``start()`` returns when every node is idle; ``stop()`` stops the daemons recorded in
    ``daemons.json`` (verified by a marker in their environment, never by name) and kills what is
    left of this cluster's jobs. Both work from another process than the one that started it.
    """

    def __init__(self, root: Path | str = DEFAULT_DIR, *, nodes: int = 2, cpus: int = 8, memory_mb: int = 4096):
        if nodes < 1 or cpus < 1:
            raise ValueError(f"nodes={nodes} and cpus={cpus} must be at least 1")
        self.root = Path(root).expanduser().absolute()
        self.nodes, self.cpus, self.memory_mb = nodes, cpus, memory_mb
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.pid_file = self.root / "daemons.json"
        self.log_dir = self.root / "log"
        self._marker = f"RINGRT_CLUSTER={self.root}".encode()
        self._procs: list[subprocess.Popen] = []  # keeps our children referenced while this object lives

    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` pointing at the cluster (for sbatch etc.)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def export_line(self) -> str:
        return f"export SLURM_CONF={self.conf}"

    # -- daemons --------------------------------------------------------------------------------------

    def _recorded(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.pid_file.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _ours(self, pid: int) -> bool:
        return _alive(pid) and self._marker in _environ(pid)

    def daemons(self) -> dict[str, bool]:
        """Each recorded daemon (``munged``, ``slurmctld``, ``slurmd n1`` ...) and whether it runs."""
        return {name: self._ours(pid) for name, pid in self._recorded().items()}

    def is_up(self) -> bool:
        """Whether munged, slurmctld and at least one slurmd recorded in this directory all run."""
        d = self.daemons()
        return {"munged", "slurmctld"} <= d.keys() and len(d) > 2 and all(d.values())

    def running_nodes(self) -> list[str]:
        """The emulated nodes this directory's daemons were started with (``n1`` ...)."""
        return [name.split()[1] for name in self._recorded() if name.startswith("slurmd ")]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name.replace(' ', '.')}.out", "ab")
        try:
            p = subprocess.Popen(argv, env={**env, "RINGRT_CLUSTER": str(self.root)}, stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        self._procs.append(p)
        pids = {**self._recorded(), name: p.pid}
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids, indent=1))
        tmp.replace(self.pid_file)

    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(mode=0o700, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket.unlink(missing_ok=True)
        self._spawn("munged", [_program("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}"],
                    dict(os.environ))
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if time.monotonic() > deadline or not _alive(self._recorded()["munged"]):
                raise ClusterError(f"munged did not start; see {self.log_dir / 'munged.out'}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        ctld_port, *slurmd_ports = _free_ports(1 + self.nodes)
        host = socket.gethostname().split(".")[0]
        r = self.root
        nodes = f"n[1-{self.nodes}]" if self.nodes > 1 else "n1"
        ports = f"[{slurmd_ports[0]}-{slurmd_ports[-1]}]" if self.nodes > 1 else str(slurmd_ports[0])
        node_line = (f"NodeName={nodes} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports} CPUs={self.cpus} "
                     f"RealMemory={self.memory_mb} State=UNKNOWN")
        self.conf.write_text(f"""\
# ringrt cluster: a one-machine Slurm (ringrt/cluster.py); written by `ringrt cluster up`.
ClusterName=ringrt
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_ports[0]}
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
{node_line}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _node_states(self) -> tuple[dict[str, str], str]:
        out = subprocess.run([_program("sinfo"), "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True,
                             text=True, timeout=30)
        states = dict(line.split(None, 1) for line in out.stdout.splitlines() if len(line.split()) == 2)
        return states, (out.stdout + out.stderr).strip()

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        """Start the daemons (a cluster already up in this directory is left as it is)."""
        check_can_run()
        if self.is_up():
            return self
        if len(str(self.munge_socket)) > _SOCKET_PATH_MAX:
            raise ClusterError(f"--dir {self.root} is too long for munge's socket path; choose a shorter directory")
        self.stop()  # whatever a half-started or crashed cluster left in this directory
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("state", "log", *(f"spool/{n}" for n in self.node_names)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._spawn("slurmctld", [_program("slurmctld"), "-D", "-i"], env)
        for n in self.node_names:
            self._spawn(f"slurmd {n}", [_program("slurmd"), "-D", "-N", n], env)
        deadline = time.monotonic() + timeout
        while True:
            states, text = self._node_states()
            if all(states.get(n) == "idle" for n in self.node_names):
                return self
            dead = [name for name, ok in self.daemons().items() if not ok]
            if dead or time.monotonic() > deadline:
                self.stop()
                why = f"{', '.join(dead)} exited" if dead else f"nodes not idle after {timeout:.0f} s (sinfo: {text!r})"
                raise ClusterError(f"Slurm did not come up: {why}; logs in {self.log_dir}")
            time.sleep(0.5)

    def _drain(self, timeout: float = 30.0) -> None:
        """Let finished jobs' steps wind down (cancel what is left) before the daemons go."""
        deadline, cancelled = time.monotonic() + timeout, False
        while time.monotonic() < deadline:
            out = subprocess.run([_program("squeue"), "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                                 timeout=30)
            if out.returncode != 0 or not out.stdout.strip():
                return
            if not cancelled and time.monotonic() > deadline - timeout / 2:
                subprocess.run([_program("scancel"), "--full", *out.stdout.split()], env=self.env, capture_output=True,
                               timeout=30)
                cancelled = True
            time.sleep(0.5)

    def _kill_job_processes(self) -> None:
        """Kill what is left of this cluster's jobs: processes whose environment names this cluster's
        SLURM_CONF inside a Slurm job (SLURM_JOB_ID set), or carries this cluster's marker (slurmstepd).
        Never this process or its ancestors (a shell that exported SLURM_CONF is not a job)."""
        conf = f"SLURM_CONF={self.conf}".encode()
        spare = _ancestors()
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            if pid in spare:
                continue
            env = _environ(pid)
            in_job = conf in env and any(v.startswith(b"SLURM_JOB_ID=") for v in env)
            if in_job or self._marker in env:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def stop(self, timeout: float = 15.0) -> None:
        """Stop this directory's daemons (jobs first) and remove ``daemons.json``; idempotent."""
        recorded = self._recorded()
        if not recorded:
            return
        if self.conf.exists() and self._ours(recorded.get("slurmctld", -1)):
            self._drain()
        for pid in reversed(list(recorded.values())):  # slurmd, slurmctld, then munged
            if self._ours(pid):
                try:
                    os.killpg(pid, signal.SIGTERM)
                except OSError:
                    pass
                deadline = time.monotonic() + timeout
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive(pid):
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
        self._kill_job_processes()
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        self.pid_file.unlink(missing_ok=True)

    def status(self) -> str:
        """A few lines: up or down, the daemons, and ``sinfo -N`` when up."""
        daemons = self.daemons()
        if not daemons:
            return f"ringrt cluster: down (nothing running from {self.root})"
        listing = ", ".join(f"{name} {'running' if ok else 'NOT running'}" for name, ok in daemons.items())
        if not all(daemons.values()):
            return (f"ringrt cluster: partly up in {self.root} ({listing}); restart it: ringrt cluster down && "
                    f"ringrt cluster up (logs in {self.log_dir})")
        states, text = self._node_states()
        nodes = ", ".join(f"{n} {states.get(n, '?')}" for n in self.running_nodes())
        return f"ringrt cluster: up in {self.root} ({listing}); nodes: {nodes}\n{self.export_line()}"


# -- ringrt cluster ---------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("up", "down", "status"),
                   help="up: start it (or say it is up) and print the export line on stdout; down: stop its "
                        "daemons and jobs (the directory and its logs stay); status: up or down, and the nodes")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                   help="where slurm.conf, the munge key and socket, state, logs and pids live (default %(default)s)")
    p.add_argument("--nodes", type=int, default=2, help="emulated nodes n1..nN (default %(default)s)")
    p.add_argument("--cpus", type=int, default=8,
                   help="CPUs each node claims, whatever the machine has (default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds `up` waits for every node to be idle (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    cluster = LocalSlurm(args.dir, nodes=args.nodes, cpus=args.cpus)
    try:
        if args.action == "status":
            print(cluster.status())
            return 0 if cluster.is_up() else 1
        if args.action == "down":
            if not any(cluster.daemons().values()):
                cluster.stop()  # forget a stale daemons.json
                print(f"ringrt cluster: nothing running in {cluster.root}", file=sys.stderr)
                return 0
            cluster.stop()
            print(f"ringrt cluster: stopped (its files and logs stay in {cluster.root})", file=sys.stderr)
            return 0
        was_up = cluster.is_up()
        cluster.start(timeout=args.timeout)
    except ClusterError as e:
        print(f"ringrt cluster {args.action}: {e}", file=sys.stderr)
        return 2
    down = "ringrt cluster down" + ("" if args.dir == DEFAULT_DIR else f" --dir {args.dir}")
    print(f"ringrt cluster: {'already up' if was_up else 'up'}: nodes {', '.join(cluster.running_nodes())} in "
          f"partition debug; files and logs in {cluster.root}; stop it with: {down}", file=sys.stderr)
    print(cluster.export_line(), flush=True)
    return 0
