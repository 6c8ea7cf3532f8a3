"""Emulated cluster links (``ringrt.simulate.links``): each rank in its own network namespace, links
shaped with tbf. Needs root and working ``ip netns``; skipped otherwise (the spec parsing and the
non-root refusal run everywhere)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import pytest

from ringrt.distributed.spawn import run_local
from ringrt.simulate import links as ln

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5555)); s.listen(); print("ready", flush=True)
c, _ = s.accept(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    n += len(b)
c.sendall(b"k"); c.close(); print(n, flush=True)
"""
CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5555), timeout=30)
t = time.perf_counter(); s.sendall(b"x" * int(sys.argv[2])); s.shutdown(socket.SHUT_WR); s.recv(1)
print(time.perf_counter() - t)
"""


def _probe() -> str | None:
    try:
        ln.check_privileges()
    except ln.LinkError as e:
        return str(e)
    name = f"rrtprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@pytest.fixture(scope="module")
def netns():
    reason = _probe()
    if reason:
        pytest.skip(reason)


def _namespaces() -> set[str]:
    return set(ln._namespaces())


def _ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, check=True).stdout


def _transfer(net: ln.Network, src: int, dst: int, nbytes: int) -> float:
    """Send ``nbytes`` over TCP from rank ``src``'s namespace to ``dst``'s; the sender's seconds until
    the receiver has it all."""
    srv = subprocess.Popen(["ip", "netns", "exec", net.namespaces[dst], sys.executable, "-c", SERVER, ln.address(dst)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        cli = subprocess.run(["ip", "netns", "exec", net.namespaces[src], sys.executable, "-c", CLIENT, ln.address(dst),
                              str(nbytes)], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert int(srv.stdout.readline()) == nbytes
        return float(cli.stdout)
    finally:
        srv.kill()
        srv.wait()


def test_parse_link():
    s = ln.parse_link("rate=200mbit,burst=64kb")
    assert (s.rate, s.burst, s.delay, s.latency) == ("200mbit", "64kb", None, "50ms")
    assert s.bytes_per_s == pytest.approx(25e6)
    assert ln.parse_link("rate=25mbps,burst=32kb,delay=1ms").bytes_per_s == pytest.approx(25e6)
    for bad in ("burst=64kb", "rate=fast", "rate=200mbit,color=red", "rate"):
        with pytest.raises(ln.LinkError):
            ln.parse_link(bad)


def test_not_root_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    net = ln.Network(3, "mesh", ln.parse_link("rate=200mbit"))
    with pytest.raises(ln.LinkError, match="needs root") as e:
        with net:
            pass
    assert "\n" not in str(e.value) and "uid 1000" in str(e.value)
    if os.path.exists("/run/netns"):
        assert not set(net.namespaces) & _namespaces()
    from ringrt.bench import compare

    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    assert compare.main(p.parse_args(["--link", "rate=200mbit", "--topology", "ring", "--out", "/nonexistent/x"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs root" in err, err


def _gloo(rank, world):
    import torch
    import torch.distributed as dist

    before = ln.interface_bytes()
    x = torch.full((1000,), float(rank))
    dist.all_reduce(x)
    y = torch.zeros(250_000)  # 1 MB from rank 0 to rank 2
    if rank == 0:
        dist.send(torch.ones(250_000), 2)
    elif rank == 2:
        dist.recv(y, 0)
    dist.barrier()
    return float(x[0]), float(y.sum()), os.environ["GLOO_SOCKET_IFNAME"], ln.io_delta(before, ln.interface_bytes())


@pytest.mark.parametrize("topology", ln.TOPOLOGIES)
def test_topology_wiring_and_gloo(netns, topology):
    with ln.Network(3, topology, ln.parse_link("rate=200mbit,burst=64kb")) as net:
        assert set(net.namespaces) <= _namespaces()
        for r, ns in enumerate(net.namespaces):
            assert f"inet {ln.address(r)}/32" in _ip(ns, "-4", "addr", "show", "dev", ln.IFNAME)
            assert "127.0.0.1" not in _ip(ns, "-4", "addr", "show", "dev", ln.IFNAME)
            for p in range(3):
                if p != r:
                    route = _ip(ns, "route", "get", ln.address(p))
                    assert f"dev {'nic' if topology == 'switch' else f'p{p}'} " in route, route
                    assert f"src {ln.address(r)}" in route, route
            qdisc = subprocess.run(["tc", "-n", ns, "qdisc", "show"], capture_output=True, text=True).stdout
            assert "tbf" in qdisc and "rate 200Mbit" in qdisc, qdisc
        res = run_local(_gloo, 3, timeout=120)
        assert [r[0] for r in res] == [3.0] * 3 and res[2][1] == 250_000.0
        assert {r[2] for r in res} == {ln.IFNAME}
        s = net.summary({r: res[r][3] for r in range(3)}, 1.0)
    per = s["link_bytes"]
    big = ("0->sw", "sw->2") if topology == "switch" else ("0->2",)
    for d in big:  # the megabyte crossed the links between 0 and 2 ...
        assert 1.0e6 <= per[d] < 1.2e6, per
    assert s["busiest_link_bytes"] == max(per.values()) and s["busy"] == pytest.approx(s["busiest_link_bytes"] / 25e6)
    if topology != "switch":  # ... and not the links of rank 1
        assert per["0->1"] < 50_000 and per["1->2"] < 50_000, per
    assert not {*net.namespaces, net.switch} & _namespaces()  # (other runs' namespaces may come and go)


def test_ring_forwards(netns):
    with ln.Network(4, "ring", ln.parse_link("rate=500mbit,burst=64kb")) as net:
        assert [net.next_hop(0, j) for j in (1, 2, 3)] == [1, 1, 3] and net.next_hop(2, 0) == 1
        assert f"via {ln.address(1)} dev p1" in _ip(net.namespaces[0], "route", "get", ln.address(2))
        c0 = net.counters()
        _transfer(net, 0, 2, 1_000_000)
        c1 = net.counters()
    per = net.directions({r: ln.io_delta(c0[r], c1[r]) for r in c0})
    assert per["0->1"] >= 1e6 and per["1->2"] >= 1e6, per  # forwarded by rank 1
    assert per["0->3"] < 10_000 and per["3->2"] < 10_000, per


def test_tbf_shapes_the_link(netns):
    with ln.Network(2, "mesh", ln.parse_link("rate=50mbit,burst=64kb")) as net:
        c0 = net.counters()
        seconds = _transfer(net, 0, 1, 2_000_000)
        c1 = net.counters()
    per = net.directions({r: ln.io_delta(c0[r], c1[r]) for r in c0})
    assert 2.0e6 <= per["0->1"] < 2.2e6, per  # the bytes on the wire: payload + TCP/IP headers
    assert 0.25 < seconds < 2.0, seconds  # 2 MB at 50 Mbit/s: ~0.33 s (unshaped veth: a few ms)


def test_cleanup_on_exception_and_stale(netns):
    with pytest.raises(RuntimeError, match="boom"):
        with ln.Network(3, "switch", ln.parse_link("rate=100mbit")) as net:
            assert {*net.namespaces, net.switch} <= _namespaces()
            raise RuntimeError("boom")
    assert not {*net.namespaces, net.switch} & _namespaces()
    dead = 4_000_000
    while os.path.exists(f"/proc/{dead}"):
        dead += 1
    stale = f"rrt{dead}x0-r0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert ln.cleanup_stale() == [stale]
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
    assert stale not in _namespaces()


def test_cleanup_on_sigterm(netns):
    code = ("import time\nfrom ringrt.simulate import links as ln\n"
            "with ln.Network(2, 'ring', ln.parse_link('rate=100mbit')) as net:\n"
            "    print(' '.join(net.namespaces), flush=True)\n    time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        names = p.stdout.readline().split()
        assert len(names) == 2 and set(names) <= _namespaces()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
    assert not set(names) & _namespaces()


def test_delay_without_netem_is_refused_clearly(netns):
    try:
        with ln.Network(2, "mesh", ln.parse_link("rate=100mbit,delay=1ms")) as net:
            qdisc = subprocess.run(["tc", "-n", net.namespaces[0], "qdisc", "show"], capture_output=True, text=True).stdout
            assert "netem" in qdisc  # this kernel has netem
    except ln.LinkError as e:
        assert "netem" in str(e) and "run without delay=" in str(e) and "\n" not in str(e)
