"""Measure this machine for the cost model: kernel FLOP/s, matmul roofline, merge bandwidth, and
gloo latency / bandwidth / overlap between two local processes. Writes the JSON ``load_machine`` reads.

Measurements (fp32, ``threads`` intra-op threads, best of ``reps``):

* ``mm_flops``: torch.mm of 1024 x 1024 matrices — the roofline the kernel is compared with.
* block kernel forward at 128 and 1024 query/key rows (8 heads), at every head_dim of
  ``HEAD_DIMS``: solves rate(m) = peak * m / (m + m_half) for ``peak`` and ``m_half``; backward at
  1024 rows for ``bwd_peak`` (``Machine.kernel_rates``; the D = 64 values also fill ``peak``,
  ``bwd_peak``, ``m_half``). On this kernel the rate depends on D: at 1024 rows, 1 thread, fp32,
  about 104 / 125 / 137 GFLOP/s forward at D = 32 / 64 / 128. A 16-row call gives the per-kernel-call
  ``overhead``.
* ``mem_bw``: one fp32 merge of (1, 8, 1024, 64), priced as the model prices it.
* gloo: ping-pong of 4 KiB and 16 MiB messages (latency, bandwidth), then a 1024-row forward kernel
  with a 16 MiB exchange in flight (``overlap`` = hidden fraction of the shorter of the two).
* compute slowdown with 1..max(``worlds``) ranks at once, lockstep steps and single bursts (``simulate.sharing``), then the
  per-call overhead of every schedule at each world size of ``worlds``, then its size-linear cost
  on a mid-size problem (``simulate.overhead``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..ops.kernels import get_kernel
from ..ops.merge import empty_accumulator, merge_
from ..distributed.spawn import run_local
from ..run.rundir import atomic_write_json
from ..schedules import costmodel
from .overhead import measure_call_overheads, measure_linear_costs
from .sharing import measure_slowdowns

HEAD_DIMS = (32, 64, 128)


def best_time(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def mm_flops(threads: int = 1, n: int = 1024, reps: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), reps)


def _qkv(s: int, heads: int = 8, d: int = 64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, s, d, generator=g) for _ in range(3)]


def kernel_rate(s: int, *, backward: bool = False, heads: int = 8, d: int = 64, reps: int = 5) -> float:
    """Block-kernel FLOP/s at s x s (non-causal); backward FLOPs counted as 2.5 x forward."""
    kern = get_kernel(torch.device("cpu"), "cpu")
    q, k, v = _qkv(s, heads, d)
    flops = 4.0 * s * s * heads * d
    if not backward:
        return flops / best_time(lambda: kern.forward(q, k, v, causal=False, mask=None, scale=0.125), reps)
    out, lse = kern.forward(q, k, v, causal=False, mask=None, scale=0.125)
    dout = torch.randn_like(out)
    delta = (dout * out).sum(-1)
    t = best_time(lambda: kern.backward(dout, q, k, v, lse, delta, causal=False, mask=None, scale=0.125), reps)
    return costmodel.BWD_FLOP_FACTOR * flops / t


def rates_at(d: int, reps: int = 5) -> dict:
    """Forward rates at 128 and 1024 rows, the fitted peak and m_half, the backward peak, at head_dim d."""
    s1, s2 = 128, 1024
    r1, r2 = kernel_rate(s1, d=d, reps=reps), kernel_rate(s2, d=d, reps=reps)
    m_half = max(1.0, (r2 - r1) / (r1 / s1 - r2 / s2)) if r1 / s1 > r2 / s2 else 1.0
    peak = r2 * (s2 + m_half) / s2
    bwd_peak = kernel_rate(s2, backward=True, d=d, reps=reps) * (s2 + m_half) / s2
    return dict(head_dim=d, rate_small=r1, rate_large=r2, peak=peak, bwd_peak=bwd_peak, m_half=m_half)


def measure_local(threads: int = 1, reps: int = 5) -> dict:
    torch.set_num_threads(threads)
    kern = get_kernel(torch.device("cpu"), "cpu")
    per_d = [rates_at(d, reps) for d in HEAD_DIMS]
    d64 = next(r for r in per_d if r["head_dim"] == 64)
    r1, r2, peak, bwd_peak, m_half = (d64[k] for k in ("rate_small", "rate_large", "peak", "bwd_peak", "m_half"))
    q, k, v = _qkv(16, 1, 64)
    overhead = best_time(lambda: kern.forward(q, k, v, causal=False, mask=None, scale=0.125), reps * 4)
    q = _qkv(1024)[0]
    acc_o, acc_l = empty_accumulator(q)
    bo, bl = torch.randn_like(q), torch.randn(q.shape[:-1])
    t_merge = best_time(lambda: merge_(acc_o, acc_l, bo, bl), reps)
    mem_bw = costmodel.MERGE_PASSES * q.numel() * 4 / t_merge
    return dict(mm_flops=mm_flops(threads, reps=reps), rate_small=r1, rate_large=r2, peak=peak, bwd_peak=bwd_peak,
                m_half=m_half, overhead=overhead, mem_bw=mem_bw, per_head_dim=per_d)


def _link_worker(rank: int, world: int, reps: int) -> dict:
    from ..distributed.comm import P2P
    import torch.distributed as dist

    chan = P2P(dist.group.WORLD, "calibrate")
    peer = 1 - rank

    def pingpong(n: int, tries: int) -> float:
        buf = torch.zeros(n, dtype=torch.uint8)

        def once():
            if rank == 0:
                chan.post(step=0, sends=[(peer, buf)]).wait()
                chan.post(step=0, recvs=[(peer, n)]).wait()
            else:
                chan.post(step=0, recvs=[(peer, n)]).wait()
                chan.post(step=0, sends=[(peer, buf)]).wait()

        dist.barrier()
        return best_time(once, tries) / 2  # one way

    small, big = 4096, 16 << 20
    # many small round trips: a single one can lose a whole scheduler tick (4 ms) on a busy box
    t_small, t_big = pingpong(small, 10 * reps), pingpong(big, reps)
    bw = (big - small) / max(1e-9, t_big - t_small)
    lat = max(1e-7, t_small - small / bw)
    kern = get_kernel(torch.device("cpu"), "cpu")
    q, k, v = _qkv(1024)
    buf = torch.zeros(big, dtype=torch.uint8)
    t_comp = best_time(lambda: kern.forward(q, k, v, causal=False, mask=None, scale=0.125), reps)

    def both():
        p = chan.post(step=0, sends=[(peer, buf)], recvs=[(peer, big)])
        kern.forward(q, k, v, causal=False, mask=None, scale=0.125)
        p.wait()

    dist.barrier()
    t_both = best_time(both, reps)
    t_comm = lat + big / bw
    overlap = (t_comp + t_comm - t_both) / min(t_comp, t_comm)
    return dict(latency=lat, bandwidth=bw, t_comp=t_comp, t_comm=t_comm, t_both=t_both, overlap=min(1.0, max(0.0, overlap)))


def calibrate(threads: int = 1, reps: int = 5, worlds: tuple[int, ...] = (2, 4),
              topology: str | None = None) -> tuple[costmodel.Machine, dict]:
    """This machine's description (kernel rates per head_dim, link, overlap, per-call overheads at
    each W of ``worlds``) and the raw measurements. ``topology``: how emulated links join the ranks
    (``links.py``; None: loopback): "mesh" gives every pair its own link (``Link.per_peer``),
    "switch" and "ring" one link per rank that its sends share (``Link.shared_egress``)."""
    local = measure_local(threads, reps)
    link = run_local(_link_worker, 2, reps, timeout=300, threads=threads)[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    m = costmodel.Machine(
        name=f"this machine ({cores} cores, gloo, {threads} thread(s) per rank, calibrated)",
        peak=local["peak"], bwd_peak=local["bwd_peak"], m_half=local["m_half"], overhead=local["overhead"],
        mem_bw=local["mem_bw"], intra=costmodel.Link(bandwidth=link["bandwidth"], latency=link["latency"],
                                                      per_peer=topology == "mesh", shared_egress=topology in ("switch", "ring")),
        ranks_per_node=1024, overlap=link["overlap"], cores=cores, threads=threads, simulated=False,
        source="ringrt simulate calibrate", tiling="aten_cpu",
        kernel_rates=tuple(costmodel.KernelRate(head_dim=r["head_dim"], peak=r["peak"], bwd_peak=r["bwd_peak"],
                                                m_half=r["m_half"]) for r in local["per_head_dim"]),
    )
    m.slowdowns, m.burst_slowdowns = measure_slowdowns(max(worlds, default=1), m.intra, threads=threads)
    m.call_overheads, calls = measure_call_overheads(m, worlds, threads=threads)
    m.linear_costs, fits = measure_linear_costs(m, worlds, threads=threads)
    return m, {"local": local, "link": link, "calls": calls, "linear_fits": fits, "slowdowns": [(x.ranks, x.factor) for x in m.slowdowns],
                "burst_slowdowns": [(x.ranks, x.factor) for x in m.burst_slowdowns]}


def write(path: Path, machine: costmodel.Machine, measured: dict) -> None:
    """Write the calibration atomically (:func:`ringrt.run.rundir.atomic_write_json`)."""
    atomic_write_json(path, {"machine": costmodel.machine_to_dict(machine), "measured": measured}, sort_keys=False)
