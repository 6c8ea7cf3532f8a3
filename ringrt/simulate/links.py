"""Emulated cluster links: every rank in a network namespace of its own, its links shaped with tbf,
so that the bytes the ranks exchange cost what they cost on a real network (``ringrt bench compare
--link rate=200mbit,burst=64kb --topology mesh``, ``ringrt simulate calibrate --link ...``).

Each rank ``r`` gets the namespace ``<prefix>r<r>`` and one address, ``10.77.0.<r+1>/32`` on the
interface ``rrt0`` in every namespace (a veth whose peer ``rrt0x`` stays beside it: a dummy interface
where the kernel has no dummy module), so gloo, told ``GLOO_SOCKET_IFNAME=rrt0``, listens on it; host
routes send the traffic to each peer over the link of the topology.
Every link is a veth pair created directly inside the namespaces (the root namespace is never
touched), and each direction is shaped on its sender's side: ``tc qdisc ... root tbf rate R burst
B latency L`` (with ``delay=``, a netem child under the tbf, where the kernel has netem)::

    mesh (W=3): one pair link per pair of ranks; rank i reaches j over link (i, j) only

        r0 ──────── r1         link (0, 1): "p1" in r0 <-> "p0" in r1
          ╲        ╱           link (0, 2): "p2" in r0 <-> "p0" in r2
           ╲      ╱            link (1, 2): "p2" in r1 <-> "p1" in r2
              r2               routes in r0: 10.77.0.2 dev p1, 10.77.0.3 dev p2

    switch (W=3): one NIC per rank ("nic"), one bridge br0 in namespace <prefix>sw

        r0 ─nic┐
        r1 ─nic┼─ r0|r1|r2 ─ br0   in r_i: 10.77.0.0/24 dev nic; shaped on "nic" (rank -> switch)
        r2 ─nic┘                   and on "r<i>" in the switch namespace (switch -> rank)

    ring (W=4): neighbour links (r, r+1 mod W) only; ip_forward on in every rank's namespace

        r0 ─ r1 ─ r2 ─ r3 ─ (r0)   routes take the shorter way round; at equal distance (W even,
                                   |i - j| = W/2) the lower rank goes up (+1) and the higher down, so
                                   both directions of a pair use the same links. r0 -> r2 is
                                   forwarded by r1: "10.77.0.3 via 10.77.0.2 dev p1 onlink".

A rank enters its namespace in :class:`Enter` (``setns`` through ctypes: ``os.setns`` is Python
3.12+), run by :func:`ringrt.distributed.spawn.run_local` before ``init_process_group``; the
``file://`` store needs no network. Link bytes: :func:`interface_bytes` reads the calling process's
own namespace (``/proc/self/net/dev``, microseconds, no subprocess), :meth:`Network.counters` every
rank namespace from outside (``ip -s -j``); :meth:`Network.directions` turns either into bytes per
link direction (``"0->1"``; for the switch, ``"0->sw"`` and ``"sw->0"``). Counted on the wire: TCP/IP
headers, acknowledgements and gloo's own messages included.

Needs root (CAP_NET_ADMIN for links and qdiscs, CAP_SYS_ADMIN for the namespaces). Names carry the
prefix ``rrt<pid>x<n>-``; :class:`Network` removes its namespaces (and with them their links) on
leaving its block, on exceptions, on SIGTERM/SIGHUP (turned into SystemExit inside the block) and at
interpreter exit, and removes those of earlier runs whose process is gone (:func:`cleanup_stale`).
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import asdict, dataclass

TOPOLOGIES = ("mesh", "switch", "ring")
IFNAME = "rrt0"  # the interface that carries a rank's address, in every namespace
_LOCAL = ("lo", IFNAME, f"{IFNAME}x")  # interfaces that are no link
_CLONE_NEWNET = 0x40000000
_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
          "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}
_SERIAL = itertools.count()
_STALE = re.compile(r"^rrt(\d+)x\d+-")


class LinkError(RuntimeError):
    """Link emulation cannot run here (no root, no ``ip``, a kernel without a qdisc) or a bad spec."""


def address(rank: int) -> str:
    return f"10.77.0.{rank + 1}"


def _rate_bits(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    unit = (m.group(2) or "bit").lower() if m else ""
    if not m or unit not in _UNITS:
        raise LinkError(f"bad link rate {text!r}: a number and one of {', '.join(_UNITS)} (tc's units), e.g. 200mbit")
    return float(m.group(1)) * _UNITS[unit]


@dataclass(frozen=True)
class LinkSpec:
    """One direction of every link: tbf ``rate`` (tc units: 200mbit, 25mbps), ``burst`` and
    ``latency`` (tbf's queue limit as a wait), optional netem ``delay``."""

    rate: str
    burst: str = "64kb"
    latency: str = "50ms"
    delay: str | None = None

    @property
    def bytes_per_s(self) -> float:
        return _rate_bits(self.rate) / 8

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_per_s": self.bytes_per_s}


def parse_link(text: str) -> LinkSpec:
    """``rate=200mbit,burst=64kb[,delay=1ms][,latency=50ms]`` -> :class:`LinkSpec`."""
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in ("rate", "burst", "latency", "delay") or not value:
            raise LinkError(f"bad --link item {part!r}: expected rate=..., burst=..., latency=..., delay=... (e.g. rate=200mbit,burst=64kb)")
        fields[key] = value
    if "rate" not in fields:
        raise LinkError(f"--link {text!r} has no rate=, e.g. rate=200mbit,burst=64kb")
    spec = LinkSpec(**fields)
    spec.bytes_per_s  # noqa: B018 (validates the rate)
    return spec


def check_privileges(link: LinkSpec | None = None) -> None:
    """Raise :class:`LinkError` with one line naming what is missing to build namespaces and links
    (and, for a ``link`` with ``delay=``, the netem qdisc: tried in a scratch namespace)."""
    if os.geteuid() != 0:
        raise LinkError(f"link emulation needs root (network namespaces, veth links, tc qdiscs); this process runs as uid {os.geteuid()}")
    try:
        with open("/proc/self/status") as f:
            eff = int(next(line.split()[1] for line in f if line.startswith("CapEff:")), 16)
        missing = [name for name, bit in _CAPS.items() if not eff >> bit & 1]
    except (OSError, StopIteration, ValueError):
        missing = []
    if missing:
        raise LinkError(f"link emulation needs {' and '.join(missing)} (root without them here: a restricted container?)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise LinkError(f"link emulation needs the `{tool}` command (Debian/Ubuntu: apt-get install iproute2)")
    if link is not None and link.delay:
        scratch = f"rrt{os.getpid()}x{next(_SERIAL)}-probe"
        _run("ip", "netns", "add", scratch)
        try:
            r = _run("tc", "-n", scratch, "qdisc", "add", "dev", "lo", "root", "netem", "delay", link.delay, check=False)
        finally:
            _run("ip", "netns", "del", scratch, check=False)
        if r.returncode:
            raise LinkError(_no_netem(link, r.stderr))


def _no_netem(link: LinkSpec, stderr: str) -> str:
    return (f"delay={link.delay} needs the kernel's netem qdisc (sch_netem), which is not available here "
            f"({' '.join(stderr.split())}); run without delay=")


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode:
        raise LinkError(f"`{' '.join(cmd)}` failed: {' '.join((r.stderr or r.stdout).split())}")
    return r


def _namespaces() -> list[str]:
    r = _run("ip", "-j", "netns", "list", check=False)
    try:
        return [n["name"] for n in json.loads(r.stdout or "[]")]
    except ValueError:
        return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Remove the namespaces of earlier runs (``rrt<pid>x<n>-...``) whose process no longer exists;
    returns their names."""
    gone = []
    for name in _namespaces():
        m = _STALE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _run("ip", "netns", "del", name, check=False)
            gone.append(name)
    return gone


@dataclass(frozen=True)
class Enter:
    """``run_local``'s ``enter`` hook: move the calling process (thread) into ``namespaces[rank]`` and
    make gloo use the address there. Picklable, for spawned processes."""

    namespaces: tuple[str, ...]

    def __call__(self, rank: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.namespaces[rank]}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {self.namespaces[rank]}: {os.strerror(err)}")
        finally:
            os.close(fd)
        os.environ["GLOO_SOCKET_IFNAME"] = IFNAME


def interface_bytes() -> dict[str, tuple[int, int]]:
    """(rx, tx) bytes of every link interface (not lo, rrt0, rrt0x) of the calling process's network namespace."""
    out = {}
    with open("/proc/self/net/dev") as f:
        for line in f.readlines()[2:]:
            name, _, rest = line.partition(":")
            vals = rest.split()
            if name.strip() not in _LOCAL:
                out[name.strip()] = (int(vals[0]), int(vals[8]))
    return out


def io_delta(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after if k in before}


class Network:
    """``world`` rank namespaces wired as ``topology`` with every link direction shaped by ``link``.

    A context manager: builds on entry (after :func:`check_privileges` and :func:`cleanup_stale`),
    makes ``run_local`` put its ranks into the namespaces (``spawn.entering``), removes everything on
    exit. ``enter`` is the picklable hook, ``links`` the list of (name, end a, end b) with an end
    ``(node, namespace, interface)`` and node a rank number or ``"sw"``.
    """

    def __init__(self, world: int, topology: str, link: LinkSpec, prefix: str | None = None):
        if topology not in TOPOLOGIES:
            raise LinkError(f"unknown topology {topology!r}: one of {', '.join(TOPOLOGIES)}")
        if world < 1:
            raise LinkError("a network needs at least one rank")
        self.world, self.topology, self.link = world, topology, link
        self.prefix = prefix or f"rrt{os.getpid()}x{next(_SERIAL)}-"
        self.namespaces = tuple(f"{self.prefix}r{r}" for r in range(world))
        self.switch = f"{self.prefix}sw" if topology == "switch" else None
        self.enter = Enter(self.namespaces)
        self.links: list[tuple[str, tuple, tuple]] = []
        self._created: list[str] = []
        self._lock = threading.Lock()
        self._closed = True
        self._old_handlers: dict = {}
        self._spawn_ctx = None

    # --- life cycle -------------------------------------------------------------------------------
    def __enter__(self) -> Network:
        check_privileges(self.link)
        cleanup_stale()
        self._closed = False
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        from ..distributed.spawn import entering

        self._spawn_ctx = entering(self.enter)
        self._spawn_ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _on_signal(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through __exit__, which removes the namespaces

    def close(self) -> None:
        """Remove every namespace this network created (their links go with them). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._spawn_ctx is not None:
            self._spawn_ctx.__exit__(None, None, None)
            self._spawn_ctx = None
        for name in reversed(self._created):
            _run("ip", "netns", "del", name, check=False)
        self._created.clear()
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
        atexit.unregister(self.close)

    # --- wiring -----------------------------------------------------------------------------------
    def _ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _pair(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        """A veth pair made directly inside the two namespaces, both ends up and shaped."""
        _run("ip", "link", "add", "name", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        for ns, dev in ((ns_a, if_a), (ns_b, if_b)):
            _run("ip", "-n", ns, "link", "set", dev, "up")
            self._shape(ns, dev)

    def _shape(self, ns: str, dev: str) -> None:
        s = self.link
        _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
             "rate", s.rate, "burst", s.burst, "latency", s.latency)
        if s.delay:
            r = _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem", "delay", s.delay,
                     check=False)
            if r.returncode:
                raise LinkError(_no_netem(s, r.stderr))

    def _address(self, r: int) -> None:
        """The rank's address on ``rrt0``, one end of a veth pair whose other end (``rrt0x``) stays in
        the same namespace: a stand-in for a dummy interface (kernels without the dummy module), up and
        running so gloo accepts it, and the only IPv4 address on it, so gloo cannot pick 127.0.0.1."""
        ns = self.namespaces[r]
        _run("ip", "link", "add", "name", IFNAME, "netns", ns, "type", "veth", "peer", "name", f"{IFNAME}x", "netns", ns)
        _run("ip", "-n", ns, "addr", "add", f"{address(r)}/32", "dev", IFNAME)
        for dev in (IFNAME, f"{IFNAME}x"):
            _run("ip", "-n", ns, "link", "set", dev, "up")

    def _route(self, r: int, dest: str, dev: str, via: str | None = None) -> None:
        cmd = ["ip", "-n", self.namespaces[r], "route", "add", dest]
        if via:
            cmd += ["via", via]
        cmd += ["dev", dev, "src", address(r)]
        if via:
            cmd += ["onlink"]
        _run(*cmd)

    def _build(self) -> None:
        for r, ns in enumerate(self.namespaces):
            self._ns(ns)
            self._address(r)
        w = self.world
        if self.topology == "mesh":
            for i, j in itertools.combinations(range(w), 2):
                self._pair(self.namespaces[i], f"p{j}", self.namespaces[j], f"p{i}")
                self.links.append((f"{i}-{j}", (i, self.namespaces[i], f"p{j}"), (j, self.namespaces[j], f"p{i}")))
                self._route(i, f"{address(j)}/32", f"p{j}")
                self._route(j, f"{address(i)}/32", f"p{i}")
        elif self.topology == "switch":
            sw = self.switch
            self._ns(sw)
            _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", sw, "link", "set", "br0", "up")
            for r, ns in enumerate(self.namespaces):
                self._pair(ns, "nic", sw, f"r{r}")
                _run("ip", "-n", sw, "link", "set", f"r{r}", "master", "br0")
                self.links.append((f"{r}-sw", (r, ns, "nic"), ("sw", sw, f"r{r}")))
                if w > 1:
                    self._route(r, "10.77.0.0/24", "nic")
        else:  # ring
            pairs = sorted({tuple(sorted((r, (r + 1) % w))) for r in range(w) if (r + 1) % w != r})
            for i, j in pairs:
                self._pair(self.namespaces[i], f"p{j}", self.namespaces[j], f"p{i}")
                self.links.append((f"{i}-{j}", (i, self.namespaces[i], f"p{j}"), (j, self.namespaces[j], f"p{i}")))
            for i in range(w):
                if w > 2:
                    _run("ip", "netns", "exec", self.namespaces[i], "sysctl", "-qw", "net.ipv4.ip_forward=1")
                for j in range(w):
                    if j == i:
                        continue
                    nxt = self.next_hop(i, j)
                    self._route(i, f"{address(j)}/32", f"p{nxt}", via=None if nxt == j else address(nxt))

    def next_hop(self, i: int, j: int) -> int:
        """Ring: the neighbour rank i sends traffic for rank j to (the shorter way; at equal
        distance the lower rank goes up, the higher down, so a pair's two directions share links)."""
        w = self.world
        up = (j - i) % w
        forward = up < w - up or (up == w - up and i < j)
        return (i + 1) % w if forward else (i - 1) % w

    # --- counters ---------------------------------------------------------------------------------
    def counters(self) -> dict[int, dict[str, tuple[int, int]]]:
        """(rx, tx) bytes of every link interface of every rank namespace, read from outside."""
        out = {}
        for r, ns in enumerate(self.namespaces):
            got = json.loads(_run("ip", "-n", ns, "-s", "-j", "link", "show").stdout or "[]")
            out[r] = {d["ifname"]: (d["stats64"]["rx"]["bytes"], d["stats64"]["tx"]["bytes"]) for d in got
                      if d["ifname"] not in _LOCAL}
        return out

    def directions(self, io: dict) -> dict[str, int]:
        """Bytes per link direction (``"i->j"``) from per-rank interface (rx, tx) bytes ``io[rank][ifname]``
        (counters or deltas, rank keys int or str): the sender's tx, or for the switch's side of a
        rank's link, the rank's rx."""
        io = {int(k): v for k, v in io.items()}
        out = {}
        for _, a, b in self.links:
            for src, dst in ((a, b), (b, a)):
                if src[0] != "sw" and src[0] in io and src[2] in io[src[0]]:
                    out[f"{src[0]}->{dst[0]}"] = int(io[src[0]][src[2]][1])
                elif dst[0] != "sw" and dst[0] in io and dst[2] in io[dst[0]]:
                    out[f"{src[0]}->{dst[0]}"] = int(io[dst[0]][dst[2]][0])
        return out

    def summary(self, io: dict, seconds: float) -> dict:
        """Per link direction bytes, the busiest one, and its busy fraction bytes / (rate x ``seconds``)."""
        per = self.directions(io)
        if not per:
            return {"link_bytes": {}, "busiest_link": None, "busiest_link_bytes": 0, "busy": 0.0}
        name = max(per, key=per.get)
        return {"link_bytes": per, "busiest_link": name, "busiest_link_bytes": per[name],
                "busy": per[name] / (self.link.bytes_per_s * seconds) if seconds > 0 else None}

    def describe(self) -> dict:
        return {"topology": self.topology, "world": self.world, "link": self.link.to_dict(),
                "addresses": {r: address(r) for r in range(self.world)}, "links": [n for n, _, _ in self.links],
                "gloo_ifname": IFNAME}
