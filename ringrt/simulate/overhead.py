"""Per-call overhead of every schedule on this machine: time tiny calls, subtract what the model prices.

A millisecond-scale call is dominated by what the step model does not price: Python, the input
agreement across ranks (``validate.agree``), group lookup, packing, autograd bookkeeping and, with
more ranks than cores, waking ranks that share a core. For each world size W, ``W`` local gloo
processes run every schedule ``ringrt.attention`` offers at W on a tiny causal zigzag problem
(chunks of ``TINY_CHUNK`` tokens, W heads of ``TINY_HEAD_DIM``), forward and forward + backward,
round-robin so machine noise hits all schedules alike. A repetition's time is the slowest rank's;
the overhead is the best repetition (the statistic ``ringrt bench compare`` reports, and the one the
kernel rates are calibrated with) minus the model's priced steps for the same problem.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..spawn import run_local
from . import costmodel as cm

TINY_CHUNK = 16
TINY_HEAD_DIM = 32


def tiny_problem(world: int, backward: bool) -> cm.Problem:
    return cm.Problem(seq=2 * world * TINY_CHUNK, heads=world, kv_heads=world, head_dim=TINY_HEAD_DIM, dtype_bytes=4,
                      causal=True, backward=backward, layout="zigzag")


def _tiny_worker(rank: int, world: int, names: list[str], reps: int, warmup: int) -> dict[tuple[str, bool], list[float]]:
    import torch.distributed as dist

    import ringrt

    times: dict[tuple[str, bool], list[float]] = {(n, b): [] for n in names for b in (False, True)}
    p = tiny_problem(world, False)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, p.seq, p.heads, p.head_dim, generator=g) for _ in range(3)]
    shards = [ringrt.shard(x, layout="zigzag") for x in full]
    for i in range(warmup + reps):
        for name, backward in times:
            q, k, v = (x.detach().clone().requires_grad_(backward) for x in shards)
            dist.barrier()
            t0 = time.perf_counter()
            out = ringrt.attention(q, k, v, causal=True, algorithm=name)
            if backward:
                out.backward(torch.ones_like(out))
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[(name, backward)].append(dt)
    return times


def measure_call_overheads(m: cm.Machine, worlds: tuple[int, ...] = (2, 4), *, reps: int = 15, warmup: int = 3,
                           threads: int = 1) -> tuple[tuple[cm.CallOverhead, ...], dict]:
    """(overheads for ``m.call_overheads``, the raw best/median and model times per world and schedule)."""
    out: list[cm.CallOverhead] = []
    raw: dict = {}
    for world in worlds:
        if world < 2:
            continue
        names = list(cm.SCHEDULES)
        res = run_local(_tiny_worker, world, names, reps, warmup, timeout=600, threads=threads)
        for name in names:
            for backward in (False, True):
                per_rep = [max(r[(name, backward)][i] for r in res) for i in range(reps)]
                measured = min(per_rep)
                priced = cm.estimate(name, tiny_problem(world, backward), _without_overheads(m), world).total
                out.append(cm.CallOverhead(schedule=name, world=world, backward=backward, seconds=max(0.0, measured - priced)))
                raw[f"{name} W={world} {'fwd+bwd' if backward else 'fwd'}"] = dict(best=measured, median=statistics.median(per_rep), priced=priced)
    return tuple(out), raw


def _without_overheads(m: cm.Machine) -> cm.Machine:
    return cm.machine_from_dict({**cm.machine_to_dict(m), "call_overheads": []})
