"""How much slower a rank's steps run when several ranks of one node compute at once.

``ranks`` local gloo processes (1 thread each) run ``STEPS`` lockstep ring steps, as every ring
schedule does: post a small exchange with both neighbours, run the same forward kernel call
(``ROWS`` x ``ROWS``, ``HEADS`` heads of ``HEAD_DIM``), wait for the exchange. A repetition's time
per step is the slowest rank's; the factor is the best repetition divided by the best one-rank
kernel time of the same calibration (the statistic ``ringrt bench compare`` reports), after taking
off the exchange's own cost as the model prices it.

With more ranks than cores the factor is well above ranks / cores. Kernels alone would share the
cores fairly (about 2 at 4 ranks on 2 cores), but a rank that waits for a neighbour's message is
woken only when a computing rank gives up its core, so lockstep steps also pay the scheduler's time
slices (measured on a 2-core box: about 1.1 at 2 ranks, 3 at 4).
"""

from __future__ import annotations

import time

import torch

from ..kernels import get_kernel
from ..spawn import run_local
from . import costmodel as cm

ROWS, HEADS, HEAD_DIM = 512, 16, 32
STEPS = 6
MSG_BYTES = 4096


def _step_worker(rank: int, world: int, reps: int) -> list[float]:
    import torch.distributed as dist

    from ..comm import P2P

    kern = get_kernel(torch.device("cpu"), "cpu")
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, HEADS, ROWS, HEAD_DIM, generator=g) for _ in range(3))
    chan = P2P(dist.group.WORLD, "sharing") if world > 1 else None
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    msg = torch.zeros(MSG_BYTES, dtype=torch.uint8)

    def step(s: int) -> None:
        p = chan.post(step=s, sends=[(nxt, msg)], recvs=[(prv, MSG_BYTES)]) if chan else None
        kern.forward(q, k, v, causal=False, mask=None, scale=0.125)
        if p:
            p.wait()

    step(0)
    out = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        for s in range(STEPS):
            step(s)
        out.append((time.perf_counter() - t0) / STEPS)
    return out


def measure_slowdowns(max_ranks: int, link: cm.Link | None = None, *, reps: int = 7, threads: int = 1) -> tuple[cm.RankSlowdown, ...]:
    """Slowdown factor at 1..``max_ranks`` ranks stepping at once (1.0 at one rank by definition);
    ``link`` prices the per-step exchange that is taken off (none if None)."""
    best = {}
    for n in range(1, max(1, max_ranks) + 1):
        res = run_local(_step_worker, n, reps, timeout=300, threads=threads)
        best[n] = min(max(r[i] for r in res) for i in range(reps))
    msg = cm.msg_time(link, MSG_BYTES) if link else 0.0
    return tuple(cm.RankSlowdown(ranks=n, factor=1.0 if n == 1 else max(1.0, (t - msg) / best[1]))
                 for n, t in best.items())
