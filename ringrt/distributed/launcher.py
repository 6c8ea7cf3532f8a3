"""The one module that knows launcher facts: torchrun, Slurm and MPI environments.

``detect()`` reads who we are from the environment:

* torchrun / torch.distributed.run: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT
* Slurm (one task per rank, ``srun``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
  SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE, SLURM_JOB_NODELIST (first node is the master)
* submitit's local executor (Hydra ``submitit_local``): SUBMITIT_LOCAL_GLOBALID, SUBMITIT_LOCAL_NTASKS
  (its Slurm executor runs one Slurm task per rank, read as Slurm)
* MPI (mpirun / srun --mpi=pmix): OMPI_COMM_WORLD_* or PMI_RANK/PMI_SIZE or PMIX_RANK; the master
  address and port are agreed through mpi4py (rank 0 broadcasts its IP and a free port) unless
  MASTER_ADDR/MASTER_PORT are set.

torchrun's variables win when present (a Slurm job that runs torchrun per node has both).
``init_distributed()`` turns that into an initialised default process group.

What is listened on: rank 0 hosts the job's TCPStore on MASTER_ADDR only (torch's TCPStore binds
every interface unless it is handed a listening socket, so we hand it one: :func:`_host_store`).
Ranks that meet at a loopback MASTER_ADDR are all on this machine, so their gloo and NCCL sockets
are pinned to the loopback interface too (:func:`pin_to_loopback`). One node under torchrun:
:func:`local_torchrun_args` (a file rendezvous, no agent store; what ``launch/run.sh`` uses), so
nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import ipaddress
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
import torch.distributed as dist

from .device import cuda_index

Source = Literal["torchrun", "slurm", "mpi", "submitit", "single"]
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True, slots=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    source: Source


@dataclass(kw_only=True, slots=True)
class LaunchConfig:
    """How ``init_distributed`` joins the ranks (the ``launcher`` config group)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto``: ``cpu:gloo,cuda:nccl`` when CUDA is available (CUDA tensors over NCCL, CPU tensors
    such as small metadata collectives over gloo), else ``gloo``. ``nccl``: the same pair, but an
    error without CUDA. ``gloo``: gloo only (jobs then run on the CPU, see :mod:`ringrt.distributed.device`)."""
    timeout_s: float = 1800.0
    """Seconds a collective may wait for a peer before the process group raises."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"launcher.backend={self.backend!r} is not valid; valid: {', '.join(BACKENDS)}")
        if not self.timeout_s > 0:
            raise ValueError(f"launcher.timeout_s={self.timeout_s!r} must be a positive number of seconds")


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for n in names:
        if env.get(n, "") != "":
            try:
                return int(env[n])
            except ValueError:
                raise ValueError(f"environment variable {n}={env[n]!r} must be an integer") from None
    return None


def first_slurm_node(nodelist: str) -> str:
    """First host of a Slurm node list: 'n[1-3,7],gpu5' -> 'n1'. Uses scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def resolve_ip(host: str) -> str:
    """An IPv4 address for ``host`` (a bare node name is not always resolvable by every rank's stack)."""
    return socket.gethostbyname(host)


def slurm_node_addr(node: str) -> str:
    """An IPv4 address of a Slurm node: its ``NodeAddr`` from scontrol (resolved), else DNS.

    Slurm node names need not be DNS names (``NodeName=n1 NodeAddr=10.0.0.5``); the controller knows.
    """
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=10)
        m = re.search(r"\bNodeAddr=(\S+)", out.stdout) if out.returncode == 0 else None
        if m:
            return resolve_ip(m.group(1))
    except (OSError, subprocess.SubprocessError, socket.gaierror):
        pass
    try:
        return resolve_ip(node)
    except socket.gaierror:
        raise ValueError(f"cannot resolve Slurm node {node!r} to an IP; set MASTER_ADDR to the first node's address") from None


def _slurm_local_world(env: Mapping[str, str]) -> int:
    v = _int(env, "SLURM_NTASKS_PER_NODE")
    if v is not None:
        return v
    tpn = env.get("SLURM_TASKS_PER_NODE", "1")  # e.g. "2(x3),1"
    return int(re.match(r"(\d+)", tpn).group(1))


def detect(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Who this process is, from the launcher's environment variables."""
    env = os.environ if env is None else env
    if _int(env, "RANK") is not None and _int(env, "WORLD_SIZE") is not None:
        return LaunchEnv(
            rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") or 0, local_world_size=_int(env, "LOCAL_WORLD_SIZE") or 1,
            master_addr=env.get("MASTER_ADDR"), master_port=_int(env, "MASTER_PORT"), source="torchrun",
        )
    mpi_rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
    if mpi_rank is not None:
        return LaunchEnv(
            rank=mpi_rank, world_size=_int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS") or 1,
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID") or 0,
            local_world_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS") or 1,
            master_addr=env.get("MASTER_ADDR"), master_port=_int(env, "MASTER_PORT"), source="mpi",
        )
    if _int(env, "SLURM_PROCID") is not None and _int(env, "SLURM_NTASKS") is not None:
        addr = env.get("MASTER_ADDR") or slurm_node_addr(first_slurm_node(env.get("SLURM_JOB_NODELIST", socket.gethostname())))
        port = _int(env, "MASTER_PORT") or 20000 + (_int(env, "SLURM_JOB_ID") or 0) % 20000
        return LaunchEnv(
            rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") or 0, local_world_size=_slurm_local_world(env),
            master_addr=addr, master_port=port, source="slurm",
        )
    if _int(env, "SUBMITIT_LOCAL_GLOBALID") is not None and _int(env, "SUBMITIT_LOCAL_NTASKS") is not None:
        # submitit's local executor (Hydra's submitit_local launcher): tasks of one job on this machine.
        ntasks = _int(env, "SUBMITIT_LOCAL_NTASKS")
        return LaunchEnv(
            rank=_int(env, "SUBMITIT_LOCAL_GLOBALID"), world_size=ntasks,
            local_rank=_int(env, "SUBMITIT_LOCAL_LOCALID") or 0, local_world_size=ntasks,
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_int(env, "MASTER_PORT") or 20000 + (_int(env, "SUBMITIT_LOCAL_JOB_ID") or 0) % 20000,
            source="submitit",
        )
    return LaunchEnv(0, 1, 0, 1, None, None, "single")


def _mpi_rendezvous(le: LaunchEnv) -> LaunchEnv:
    if le.master_addr and le.master_port:
        return le
    from mpi4py import MPI  # the optional `mpi` extra

    comm = MPI.COMM_WORLD
    info = None
    if comm.Get_rank() == 0:
        # Every rank on this node (mpirun -np N here): meet on loopback, listen nowhere else.
        addr = "127.0.0.1" if le.local_world_size == le.world_size else resolve_ip(socket.gethostname())
        with socket.socket() as s:
            s.bind((addr, 0))
            port = s.getsockname()[1]
        info = (addr, port)
    addr, port = comm.bcast(info, root=0)
    return LaunchEnv(le.rank, le.world_size, le.local_rank, le.local_world_size, addr, port, "mpi")


_RUN_ID_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID", "PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def run_id(env: Mapping[str, str] | None = None) -> str | None:
    """An id every rank of one launch shares (torchrun ``--rdzv-id``, Slurm job id, ...), or None.

    Used to name a shared output directory when the user gave none; stable across torchrun restarts.
    torchrun's own ids are skipped: ``--standalone`` draws a random UUID per launch and a rendezvous
    without ``--rdzv-id`` is called ``none``; neither names this run (see :func:`command_id`).
    """
    env = os.environ if env is None else env
    for name in _RUN_ID_VARS:
        v = env.get(name)
        if not v or (name == "TORCHELASTIC_RUN_ID" and (v == "none" or _UUID.fullmatch(v))):
            continue
        return re.sub(r"[^A-Za-z0-9_.-]", "_", v)
    return None


def program_argv() -> list[str]:
    """What follows the interpreter on this process's command line: ``[script, *args]`` or
    ``["-m", module, *args]`` (torchrun, mpirun and srun pass it to every rank unchanged)."""
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-m", "-c", "-"):
        i += 2 if argv[i] in ("-X", "-W", "-Q") else 1
    return argv[i:]


def command_id(world_size: int, argv: Sequence[str] | None = None) -> str:
    """A short id of "this program with these arguments on this many ranks": the same for a re-run
    of the same command (so it can resume), different when any argument differs."""
    argv = program_argv() if argv is None else list(argv)
    digest = hashlib.sha256("\0".join([str(world_size), *argv]).encode()).hexdigest()[:10]
    if argv[:1] == ["-m"] and len(argv) > 1:
        name = argv[1]  # the module
    else:
        name = os.path.splitext(os.path.basename(argv[0]))[0] if argv else "run"  # the script: train, eval, ...
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{digest}"


LAUNCH_COMMAND_VAR = "RINGRT_LAUNCH_COMMAND"
"""Set by ``launch/run.sh``: the shell words that started this launch before the program
(``NPROC_PER_NODE=2 ./launch/run.sh``), for :func:`launch_command`."""


def _parent_argv() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _torchrun_prefix(program: list[str], env: Mapping[str, str]) -> list[str]:
    """torchrun's part of the agent's command line (our parent), e.g. ``torchrun --standalone --nproc-per-node=2``."""
    agent = _parent_argv()
    if program and len(agent) > len(program) and agent[len(agent) - len(program):] == program:
        opts = agent[: len(agent) - len(program)]
        if len(opts) >= 2 and os.path.basename(opts[1]) == "torchrun":
            return ["torchrun", *opts[2:]]
        if opts[1:3] == ["-m", "torch.distributed.run"]:
            return ["python", *opts[1:]]
    return ["torchrun", f"--nnodes={env.get('GROUP_WORLD_SIZE', '1')}",
            f"--nproc-per-node={env.get('LOCAL_WORLD_SIZE', '1')}"]


def launch_command(extra: Sequence[str] = (), env: Mapping[str, str] | None = None) -> str:
    """The shell command that started this launch again, with ``extra`` arguments appended to the
    program's (e.g. the run directory to resume in): ``launch/run.sh``'s own words when it started
    us, the agent's command line under torchrun, else ``python`` (``mpirun -np N python``, ``srun python``)."""
    env = os.environ if env is None else env
    program = program_argv()
    words = [*program, *extra]
    if env.get(LAUNCH_COMMAND_VAR):
        return f"{env[LAUNCH_COMMAND_VAR]} {shlex.join(words)}"
    le = detect(env)
    if le.source == "torchrun" and env.get("TORCHELASTIC_RUN_ID"):
        prefix = _torchrun_prefix(program, env)
    elif le.source == "mpi":
        prefix = ["mpirun", "-np", str(le.world_size), "python"]
    elif le.source == "slurm":
        prefix = ["srun", f"--ntasks={le.world_size}", "python"]
    elif program and program[0] != "-m" and not program[0].endswith(".py") and os.path.basename(program[0]) == "ringrt":
        return shlex.join(["ringrt", *words[1:]])  # the console script
    else:
        prefix = ["python"]
    return shlex.join([*prefix, *words])


def global_rank() -> int:
    """This process's global rank: from the process group once initialised, else the environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return detect().rank


def process_group_backend(backend: str, local_rank: int) -> tuple[str, torch.device | None]:
    """(backend string for ``init_process_group``, CUDA device to bind it to or None).

    ``auto`` -> ``cpu:gloo,cuda:nccl`` on ``cuda:<local_rank % device_count>`` when CUDA is
    available, else ``gloo``; ``nccl`` -> the same pair, ValueError without CUDA (CPU tensors keep a
    gloo path: ``all_gather_object``, barriers and CPU metadata collectives work either way);
    ``gloo`` -> ``gloo``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"launcher.backend={backend!r} is not valid; valid: {', '.join(BACKENDS)}")
    if backend == "gloo" or (backend == "auto" and not torch.cuda.is_available()):
        return "gloo", None
    if not torch.cuda.is_available():
        raise ValueError("launcher.backend='nccl' needs CUDA, but torch.cuda.is_available() is False on this rank "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); valid here: 'auto', 'gloo'")
    return "cpu:gloo,cuda:nccl", torch.device("cuda", cuda_index(local_rank))


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and literal loopback addresses (127.0.0.0/8, ::1); a host name that
    merely resolves to one (Debian's 127.0.1.1 for the machine's name) is not."""
    if not host:
        return False
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_interface() -> str:
    """Name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS)."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        names = set()
    return next((n for n in ("lo", "lo0") if n in names), "lo")


def pin_to_loopback(env: dict | None = None) -> None:
    """Make this process's gloo and NCCL sockets listen (and connect) on the loopback interface only,
    for ranks that all run on this machine. Values the user set win.

    Without it gloo listens on the address the host name resolves to and NCCL's bootstrap on the
    first non-loopback interface: reachable from the network.
    """
    env = os.environ if env is None else env
    lo = loopback_interface()
    env.setdefault("GLOO_SOCKET_IFNAME", lo)
    env.setdefault("NCCL_SOCKET_IFNAME", lo)


def _listen_socket(host: str, port: int) -> socket.socket | None:
    """A socket listening on ``host:port`` only, or None when ``host`` is a name or not an address of
    this machine (the store then binds every interface, as torch does by default)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRNOTAVAIL:  # MASTER_ADDR is not an address of this machine (NAT, forwarded)
            return None
        raise RuntimeError(f"rank 0 cannot listen on MASTER_ADDR:MASTER_PORT = {host}:{port}: {e.strerror}; "
                           f"choose another MASTER_PORT") from None
    s.listen(1024)
    return s


_hosted: list = []  # rank 0's store server, kept until shutdown()


def _host_store(le: LaunchEnv, timeout: datetime.timedelta) -> None:
    """On rank 0: start the job's TCPStore server on MASTER_ADDR only, when that is an address of
    this machine. TCPStore binds every interface and has no bind-address argument, but it takes a
    socket that already listens; the store ``init_process_group(init_method="tcp://...")`` then
    creates on that port shares this server (multi-tenant stores share a server per port)."""
    sock = _listen_socket(le.master_addr, le.master_port)
    if sock is None:
        return
    _hosted.append(dist.TCPStore(le.master_addr, le.master_port, None, is_master=True, timeout=timeout,
                                 wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.detach()))


def local_torchrun_args(rdzv_file: str) -> list[str]:
    """torchrun options for one node that listen on loopback only (with :data:`LOCAL_TORCHRUN_ENV`).

    ``--standalone`` makes the agent host two TCPStores on every interface (the rendezvous store and
    the store it shares with the workers). Instead: the c10d rendezvous runs on a file store
    (``rdzv_file``, in a directory only we can read), the agent hosts no store for the workers
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) and tells them ``MASTER_ADDR=127.0.0.1``
    (``--local-addr``); rank 0 then hosts the store on 127.0.0.1 (:func:`init_distributed`).
    """
    return ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_file}", "--rdzv-conf=store_type=file",
            "--local-addr=127.0.0.1"]


LOCAL_TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> LaunchEnv:
    """Initialise the default process group from the launcher's environment (no-op for one process).

    The backend is :func:`process_group_backend`'s: with CUDA, ``cpu:gloo,cuda:nccl``, the current
    CUDA device set to ``local_rank % device_count`` and the group bound to it (``device_id``: NCCL
    connects at once and sub-groups split from it). Jobs then run on :func:`ringrt.distributed.device.job_device`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; valid: {', '.join(BACKENDS)}")
    le = detect()
    if le.source == "mpi":
        le = _mpi_rendezvous(le)
    if le.world_size == 1 or dist.is_initialized():
        return le
    pg_backend, device = process_group_backend(backend, le.local_rank)
    if device is not None:
        torch.cuda.set_device(device)
    if not le.master_addr or not le.master_port:
        raise ValueError(f"launcher {le.source!r} gave no MASTER_ADDR/MASTER_PORT; set them in the environment")
    timeout = datetime.timedelta(seconds=timeout_s)
    if is_loopback(le.master_addr):
        pin_to_loopback()
    if le.source == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent hosts the store and keeps it (same MASTER_PORT) across --max-restarts
        # attempts: without a per-attempt prefix, restarted ranks read the dead ranks' gloo
        # addresses from the previous attempt and fail with "connectFullMesh ... Connection refused".
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(le.master_addr, le.master_port, le.world_size, is_master=False, timeout=timeout)
        dist.init_process_group(pg_backend, store=dist.PrefixStore(f"ringrt/attempt_{attempt}", store),
                                rank=le.rank, world_size=le.world_size, timeout=timeout, device_id=device)
        return le
    if le.rank == 0:
        _host_store(le, timeout)
    dist.init_process_group(
        pg_backend, init_method=f"tcp://{le.master_addr}:{le.master_port}", rank=le.rank, world_size=le.world_size,
        timeout=timeout, device_id=device,
    )
    return le


def shutdown() -> None:
    """Leave the launch cleanly: destroy the process group, then finalize MPI if it was started.

    Call before ``os._exit`` (which skips interpreter teardown, where gloo threads can abort the
    process); mpirun reports a rank that exits without MPI_Finalize as a failure.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _hosted.clear()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
