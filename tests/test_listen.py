"""Single-node runs listen on loopback only, and run.sh does not echo the user's arguments.

While a run is alive, every listening TCP socket owned by one of its processes (socket inodes from
``/proc/<pid>/fd`` matched against ``/proc/net/tcp`` and ``tcp6``) must be bound to 127.0.0.0/8 or ::1.
Covered: ``launch/run.sh`` (torchrun agent + 2 ranks training), ``ringrt.distributed.spawn.run_local`` (demo,
bench, gpucheck schedules: gloo over a file store), mpirun on one node.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.launch_util import PYTHON, REPO

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")


def _address(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """'0100007F:1F90' -> (127.0.0.1, 8080): /proc/net/tcp* print each 32-bit word in host order."""
    ip, port = field.split(":")
    raw = bytes.fromhex(ip)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port, 16)


def listening(pids: list[int]) -> set[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket these processes hold."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in owner:  # 0A: TCP_LISTEN
                    ip, port = _address(cols[1])
                    found.add((owner[cols[9]], str(ip), port))
    return found


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _tree(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def watch(cmd: list[str], *, timeout: float, cwd: Path, env: dict | None = None):
    """Run ``cmd``; sample the listening sockets of its process tree until it ends. Returns (exit code,
    stdout, stderr, {(pid, address, port)}, pids seen, {pid: command line})."""
    p = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    import threading

    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()), daemon=True)
               for k, f in (("stdout", p.stdout), ("stderr", p.stderr))]
    for t in readers:
        t.start()
    seen: set[tuple[int, str, int]] = set()
    cmdlines: dict[int, list[str]] = {}
    deadline = time.monotonic() + timeout
    try:
        while p.poll() is None:
            assert time.monotonic() < deadline, f"{cmd} did not finish within {timeout} s"
            pids = _tree(p.pid)
            for pid in pids:
                if pid not in cmdlines:
                    try:
                        cmdlines[pid] = psutil.Process(pid).cmdline()
                    except psutil.Error:
                        pass
            seen |= listening(pids)
            time.sleep(0.02)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
        p.wait()
        for t in readers:
            t.join(timeout=10)
    return p.returncode, out.get("stdout", ""), out.get("stderr", ""), seen, set(cmdlines), cmdlines


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.timeout(180)
def test_run_sh_on_one_node_listens_on_loopback_only_and_echoes_no_arguments(tmp_path):
    code, out, err, seen, _, _ = watch(
        [str(REPO / "launch" / "run.sh"), str(REPO / "launch" / "train.py"), "data.seq_len=64", "data.batch_size=2",
         "train.steps=6", "train.log_every=2", "logging.wandb=disabled", "train.progress=false",
         "logging.name=SECRET123"],
        timeout=150, cwd=tmp_path, env={"NPROC_PER_NODE": "2"})
    assert code == 0, err[-3000:]
    assert seen, "no listening socket observed: the sampling missed the run"  # rank 0 hosts the job's store
    exposed = sorted(s for s in seen if not _is_loopback(s[1]))
    assert not exposed, f"listening beyond loopback (pid, address, port): {exposed}"
    assert "SECRET123" not in out + err  # no `set -x`: overrides (keys, tokens) stay out of job logs
    summary = [line for line in err.splitlines() if line.startswith("run.sh:")]
    assert summary == ["run.sh: nnodes=1 nproc_per_node=2 max_restarts=0 rendezvous: this machine, 127.0.0.1 only"]


def _hold(rank: int, world: int, seconds: float) -> int:
    import torch
    import torch.distributed as dist

    x = torch.ones(1)
    dist.all_reduce(x)  # the gloo pairs are connected
    time.sleep(seconds)
    return int(x.item())


_SPAWN = """
import sys
from ringrt.distributed.spawn import run_local
from tests.test_listen import _hold
assert run_local(_hold, 2, 3.0, timeout=120) == [2, 2]
"""


@pytest.mark.timeout(150)
def test_spawned_ranks_listen_on_loopback_only():
    code, _, err, seen, _, _ = watch([PYTHON, "-c", _SPAWN], timeout=130, cwd=REPO)
    assert code == 0, err[-3000:]
    assert seen, "no listening socket observed (gloo listens for its pairs)"
    assert not [s for s in seen if not _is_loopback(s[1])], seen


def _network_address() -> str | None:
    """An IPv4 address of this machine beyond loopback, or None."""
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]
    return addrs[0] if addrs else None


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "-u", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(_network_address() is None or not _can_unshare(), reason="needs a network address and unshare (root)")
@pytest.mark.timeout(150)
def test_spawned_ranks_listen_on_loopback_even_when_the_host_name_resolves_to_the_network(tmp_path):
    """gloo listens on the address the host name resolves to (the network, on most machines): in a
    private mount and UTS namespace, name this host ``ringrt-net-host`` -> its network address."""
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{_network_address()} ringrt-net-host\n")
    script = tmp_path / "spawn.py"
    body = "".join(f"    {line}\n" for line in _SPAWN.strip().splitlines())
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nif __name__ == '__main__':\n{body}")
    inner = f"mount --bind {hosts} /etc/hosts && hostname ringrt-net-host && exec {PYTHON} {script}"
    code, _, err, seen, _, _ = watch(["unshare", "-m", "-u", "sh", "-c", inner], timeout=130, cwd=REPO)
    assert code == 0, err[-3000:]
    assert seen and not [s for s in seen if not _is_loopback(s[1])], seen


def _openmpi_shared_memory_btl() -> str | None:
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if "Open MPI" not in out:
        return None
    return "vader" if " 4." in out or " 3." in out else "sm"


@pytest.mark.skipif(shutil.which("mpirun") is None or _openmpi_shared_memory_btl() is None, reason="needs OpenMPI")
@pytest.mark.timeout(150)
def test_mpirun_on_one_node_ranks_listen_on_loopback_only(tmp_path):
    """The ranks' own sockets (the store, gloo). OpenMPI's are OpenMPI's: its TCP transport is left out
    here (shared memory on one node), and mpirun's own listeners are not ours (docs/launch.md)."""
    btl = f"self,{_openmpi_shared_memory_btl()}"
    code, out, err, seen, pids, cmdlines = watch(
        [shutil.which("mpirun"), "--allow-run-as-root", "--oversubscribe", "--mca", "btl", btl, "-np", "2", PYTHON,
         "-m", "ringrt.jobs.probe", "--seq-len", "256", "--out", str(tmp_path / "probe.json")], timeout=130, cwd=tmp_path)
    assert code == 0, err[-3000:]
    ranks = {pid for pid, cmd in cmdlines.items() if cmd and Path(cmd[0]).name.startswith("python")}
    ours = {s for s in seen if s[0] in ranks}
    assert ours, seen
    assert not [s for s in ours if not _is_loopback(s[1])], ours
