"""Per-call overhead and linear cost of every schedule on this machine, from timed calls.

Overhead. A millisecond-scale call is dominated by what the step model does not price: Python, the
input agreement across ranks (``validate.agree``), group lookup, packing, autograd bookkeeping and,
with more ranks than cores, waking ranks that share a core. For each world size W, ``W`` local gloo
processes run every schedule ``ringrt.attention`` offers at W on a tiny causal zigzag problem
(chunks of ``TINY_CHUNK`` tokens, W heads of ``TINY_HEAD_DIM``), forward and forward + backward,
round-robin so machine noise hits all schedules alike. A repetition's time is its makespan;
the overhead is the best repetition (the statistic ``ringrt bench compare`` reports, and the one the
kernel rates are calibrated with) minus the model's priced steps for the same problem.

Linear cost. Then the same processes time a mid-size call (``FIT_TOKENS_PER_RANK`` tokens per rank,
``FIT_HEADS`` heads of ``FIT_HEAD_DIM``: a problem ``ringrt bench compare`` does not run) the same
way; linear cost = (best repetition - overhead - priced steps) / bytes of a rank's q, k, v shards. It
carries what grows with the shard but is not priced: fresh receive and result buffers (page faults
cost more than the copies), Python per block, ranks waking on shared cores.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..distributed.spawn import makespans, run_local
from ..schedules import costmodel as cm

TINY_CHUNK = 16
TINY_HEAD_DIM = 32
FIT_TOKENS_PER_RANK = 768
FIT_HEADS = 12  # divisible by every world size Ulysses is fitted at (1, 2, 3, 4, 6)
FIT_HEAD_DIM = 64


def tiny_problem(world: int, backward: bool) -> cm.Problem:
    return cm.Problem(seq=2 * world * TINY_CHUNK, heads=world, kv_heads=world, head_dim=TINY_HEAD_DIM, dtype_bytes=4,
                      causal=True, backward=backward, layout="zigzag")


def fit_problem(world: int, backward: bool) -> cm.Problem:
    return cm.Problem(seq=world * FIT_TOKENS_PER_RANK, heads=FIT_HEADS, kv_heads=FIT_HEADS, head_dim=FIT_HEAD_DIM,
                      dtype_bytes=4, causal=True, backward=backward, layout="zigzag")


def _timing_worker(rank: int, world: int, names: list[str], reps: int, warmup: int, problem: dict) -> dict[tuple[str, bool], list[tuple[float, float]]]:
    import torch.distributed as dist

    import ringrt

    times: dict[tuple[str, bool], list[tuple[float, float]]] = {(n, b): [] for n in names for b in (False, True)}
    p = cm.Problem(**problem)
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
            t1 = time.perf_counter()
            if i >= warmup:
                times[(name, backward)].append((t0, t1))
    return times


def _timed(world: int, names: list[str], reps: int, warmup: int, p: cm.Problem, threads: int) -> dict[tuple[str, bool], list[float]]:
    """Per (schedule, backward): the makespan of each repetition (:func:`ringrt.distributed.spawn.makespans`)."""
    from dataclasses import asdict

    res = run_local(_timing_worker, world, names, reps, warmup, asdict(p), timeout=900, threads=threads)
    return {key: makespans([r[key] for r in res]) for key in res[0]}


def _measured(m: cm.Machine, worlds: tuple[int, ...], problem, reps: int, warmup: int, threads: int):
    """Per world size > 1, schedule and pass: (world, name, backward, problem, best makespan, median
    makespan, priced seconds without overheads or linear costs). ``problem(world, backward)``."""
    bare = _without_overheads(m)
    for world in worlds:
        if world < 2:
            continue
        timed = _timed(world, list(cm.SCHEDULES), reps, warmup, problem(world, False), threads)
        for (name, backward), per_rep in timed.items():
            p = problem(world, backward)
            priced = cm.estimate(name, p, bare, world).total
            yield world, name, backward, p, min(per_rep), statistics.median(per_rep), priced


def _label(name: str, world: int, backward: bool) -> str:
    return f"{name} W={world} {'fwd+bwd' if backward else 'fwd'}"


def measure_call_overheads(m: cm.Machine, worlds: tuple[int, ...] = (2, 4), *, reps: int = 15, warmup: int = 3,
                           threads: int = 1) -> tuple[tuple[cm.CallOverhead, ...], dict]:
    """(overheads for ``m.call_overheads``, the raw best/median and model times per world and schedule)."""
    out: list[cm.CallOverhead] = []
    raw: dict = {}
    for world, name, backward, _, best, median, priced in _measured(m, worlds, tiny_problem, reps, warmup, threads):
        out.append(cm.CallOverhead(schedule=name, world=world, backward=backward, seconds=max(0.0, best - priced)))
        raw[_label(name, world, backward)] = dict(best=best, median=median, priced=priced)
    return tuple(out), raw


def measure_linear_costs(m: cm.Machine, worlds: tuple[int, ...] = (2, 4), *, reps: int = 4, warmup: int = 1,
                         threads: int = 1) -> tuple[tuple[cm.LinearCost, ...], dict]:
    """(costs for ``m.linear_costs``, the raw times) from the mid-size problem; ``m`` must carry the
    per-call overheads already."""
    out: list[cm.LinearCost] = []
    raw: dict = {}
    for world, name, backward, p, best, _, priced in _measured(m, worlds, fit_problem, reps, warmup, threads):
        extra = max(0.0, best - cm.call_overhead(m, name, world, backward) - priced)
        out.append(cm.LinearCost(schedule=name, world=world, backward=backward, seconds_per_byte=extra / cm.shard_bytes(p, world)))
        raw[_label(name, world, backward)] = dict(best=best, priced_steps=priced, extra=extra)
    return tuple(out), raw


def _without_overheads(m: cm.Machine) -> cm.Machine:
    return cm.machine_from_dict({**cm.machine_to_dict(m), "call_overheads": [], "linear_costs": []})
