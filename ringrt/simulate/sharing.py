"""How much slower a rank's kernel runs when several ranks of one node compute at once.

``ranks`` local gloo processes (1 thread each) meet at a barrier, then each runs the same forward
kernel call (``ROWS`` x ``ROWS``, ``HEADS`` heads of ``HEAD_DIM``); a repetition's time is the slowest
rank's, and the factor is its median over repetitions divided by the one-rank median measured in the
same calibration. With more ranks than cores the factor is not ranks / cores: ranks waiting in gloo
and the scheduler's time slices cost more (measured on a 2-core box: 1.04 at 2 ranks, 2.2 at 3,
3.6 at 4).
"""

from __future__ import annotations

import statistics
import time

import torch

from ..kernels import get_kernel
from ..spawn import run_local
from . import costmodel as cm

ROWS, HEADS, HEAD_DIM = 512, 16, 32


def _burst_worker(rank: int, world: int, reps: int) -> list[float]:
    import torch.distributed as dist

    kern = get_kernel(torch.device("cpu"), "cpu")
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, HEADS, ROWS, HEAD_DIM, generator=g) for _ in range(3))
    kern.forward(q, k, v, causal=False, mask=None, scale=0.125)
    out = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        kern.forward(q, k, v, causal=False, mask=None, scale=0.125)
        out.append(time.perf_counter() - t0)
    return out


def measure_slowdowns(max_ranks: int, *, reps: int = 15, threads: int = 1) -> tuple[cm.RankSlowdown, ...]:
    """Slowdown factor at 1..``max_ranks`` ranks running at once (1.0 at one rank by definition)."""
    medians = {}
    for n in range(1, max(1, max_ranks) + 1):
        res = run_local(_burst_worker, n, reps, timeout=300, threads=threads)
        medians[n] = statistics.median(max(r[i] for r in res) for i in range(reps))
    return tuple(cm.RankSlowdown(ranks=n, factor=t / medians[1]) for n, t in medians.items())
