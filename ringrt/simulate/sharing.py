"""How much slower a rank's compute runs when several ranks of one node compute at once.

Two patterns, each measured at 1..n ranks (local gloo processes, 1 thread each):

* burst: every rank runs one kernel call at once, no exchange in between: what a single-step
  schedule (Ulysses, all-gather) does between its collectives.
* steps: ``STEPS`` lockstep ring steps, as every ring schedule does: post a small exchange with both neighbours, run the same forward kernel call
(``ROWS`` x ``ROWS``, ``HEADS`` heads of ``HEAD_DIM``), wait for the exchange. A repetition's time
per step is its makespan (first rank's start to last rank's end, on the clock the processes share)
divided by the steps, after taking off the exchange's own cost as the model prices it; a burst's
time is its makespan too: a rank that the scheduler starts late also starts its own clock late.

A factor is the best repetition divided by the best one-rank time of the same pattern (the statistic
``ringrt bench compare`` reports). With more ranks than cores a burst shares the cores fairly (about
2.1 at 4 ranks on 2 cores, 1.0 at 2), but lockstep steps cost more (about 2.5 to 2.7 at 4, 1.1 at
2): a rank that waits for a neighbour's message is woken onto a core where another rank is
computing, so the ranks do not spread evenly over the cores until the scheduler rebalances them.
"""

from __future__ import annotations

import time

import torch

from ..ops.kernels import get_kernel
from ..distributed.spawn import makespans, run_local
from ..schedules import costmodel as cm

ROWS, HEADS, HEAD_DIM = 512, 16, 32
STEPS = 6
MSG_BYTES = 4096


def _worker(rank: int, world: int, reps: int, steps: int, exchange: bool) -> list[tuple[float, float]]:
    """(start, end) of each repetition of ``steps`` kernel calls, each inside a small exchange with
    both ring neighbours when ``exchange`` (lockstep ring steps), else back to back (a burst)."""
    import torch.distributed as dist

    from ..distributed.comm import P2P

    kern = get_kernel(torch.device("cpu"), "cpu")
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, HEADS, ROWS, HEAD_DIM, generator=g) for _ in range(3))
    chan = P2P(dist.group.WORLD, "sharing") if exchange and world > 1 else None
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
        for s in range(steps):
            step(s)
        out.append((t0, time.perf_counter()))
    return out


def _best(n: int, reps: int, threads: int, steps: int, exchange: bool) -> float:
    """Best makespan over ``reps`` repetitions (first rank's start to last rank's end)."""
    return min(makespans(run_local(_worker, n, reps, steps, exchange, timeout=300, threads=threads)))


def measure_slowdowns(max_ranks: int, link: cm.Link | None = None, *, reps: int = 7,
                      threads: int = 1) -> tuple[tuple[cm.RankSlowdown, ...], tuple[cm.RankSlowdown, ...]]:
    """(lockstep-step factors, burst factors) at 1..``max_ranks`` ranks (1.0 at one rank by
    definition); ``link`` prices the per-step exchange taken off the steps (none if None)."""
    msg = cm.msg_time(link, MSG_BYTES) if link else 0.0
    steps, bursts = {}, {}
    for n in range(1, max(1, max_ranks) + 1):
        steps[n] = _best(n, reps, threads, STEPS, exchange=True) / STEPS - (msg if n > 1 else 0.0)
        bursts[n] = _best(n, 2 * reps, threads, 1, exchange=False)

    def factors(t: dict) -> tuple[cm.RankSlowdown, ...]:
        return tuple(cm.RankSlowdown(ranks=n, factor=1.0 if n == 1 else max(1.0, x / t[1])) for n, x in t.items())

    return factors(steps), factors(bursts)
