"""Hybrid attention: Ulysses inside groups of u ranks, KV-ring across the W/u groups (USP-style).

Note [Hybrid]
-------------
Ranks are laid out as a (W/u) x u grid, rank = g*u + b. The u ranks of row g (one node, ideally)
run Ulysses' all-to-all: afterwards rank (g, b) holds all tokens of row g for heads slice b, in
ascending global order. Column b (the ranks holding heads slice b in every row) then runs the
KV-ring of :mod:`ring` over those larger shards, and a second all-to-all returns sequence shards::

    W = 4, u = 2      ulysses groups (rows):  {0, 1} {2, 3}      ring groups (columns): {0, 2} {1, 3}

With the zigzag layout a row's tokens are chunks {g*u..g*u+u-1} and their mirror images, so the
ring across rows stays balanced under a causal mask. Heavy all-to-all traffic stays inside the
node; only K/V of H/u heads crosses nodes, over W/u - 1 ring steps.

The degree u is :func:`hybrid_degree`: a set degree (``RINGRT_ULYSSES_DEGREE``) if any, else the
largest u < W that divides W, fits the heads (see :func:`ulysses.ulysses_problem`) and the ranks per
node (``LOCAL_WORLD_SIZE``); u = 1 is a plain KV-ring, u = W plain Ulysses. :func:`hybrid_degree` is
pure; :func:`runtime_degree` reads the two settings from the environment (the cost model gets them
from ``auto``).
"""

from __future__ import annotations

import os

import torch

from ..distributed.groups import RingGroups, grid_groups
from ..ops.layout import rank_chunks
from .base import RingPlan
from .ring import KVRing, kv_ring_backward, kv_ring_forward
from .ulysses import HeadShards, head_sharded_pass, ulysses_problem


def hybrid_degree(world: int, heads: int, kv_heads: int, ranks_per_node: int, degree: int | None = None) -> int:
    """The Ulysses degree u of the hybrid for this problem (see the module note): ``degree`` when
    set, else the largest proper divisor of ``world`` that fits the heads and ``ranks_per_node``."""
    if degree is not None:
        return degree
    ok = [u for u in range(1, world + 1) if world % u == 0 and u <= ranks_per_node and ulysses_problem(heads, kv_heads, u) is None]
    proper = [u for u in ok if u < world]
    return max(proper) if proper else max(ok)


def degree_setting(world: int) -> int | None:
    """``RINGRT_ULYSSES_DEGREE`` (a divisor of ``world``), or None when unset."""
    env = os.environ.get("RINGRT_ULYSSES_DEGREE")
    if not env:
        return None
    u = int(env)
    if u < 1 or world % u:
        raise ValueError(f"RINGRT_ULYSSES_DEGREE={env} must be a divisor of the world size {world}")
    return u


def runtime_degree(world: int, heads: int, kv_heads: int) -> int:
    """:func:`hybrid_degree` under this process's settings: ``RINGRT_ULYSSES_DEGREE``, else the ranks
    per node from ``LOCAL_WORLD_SIZE`` (default: all of ``world``)."""
    u = degree_setting(world)
    if u is not None:
        return u
    return hybrid_degree(world, heads, kv_heads, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def hybrid_groups(g: RingGroups, u: int, device, timeout: float | None = None) -> tuple:
    """(ulysses group, K/V group, dK/dV group) of this rank for degree ``u`` over ``g``; None where
    that part does not run. u = 1 is a KV-ring over the whole group (its two lanes); u = W is
    Ulysses over the whole group (the base); otherwise a registered grid, or
    :func:`ringrt.distributed.groups.grid_groups`."""
    n = g.world // u
    if g.world == 1:
        return None, None, None
    if u == 1:
        return None, *g.lanes
    if n == 1:
        return g.base, None, None
    if u in g.grids:
        return g.grids[u]
    return grid_groups(g.base, g.world, g.rank, u, device, timeout)


def _shards(q: torch.Tensor, k: torch.Tensor, plan: RingPlan) -> HeadShards:
    """The Ulysses row of this rank and the KV-ring across the rows (see the module note)."""
    g = plan.groups
    u = runtime_degree(g.world, q.shape[2], k.shape[2])
    problem = ulysses_problem(q.shape[2], k.shape[2], u)
    if problem:
        raise ValueError(f"ringrt.attention(algorithm='hybrid'): {problem} (set RINGRT_ULYSSES_DEGREE)")
    n = g.world // u
    ug, kv_group, grad_group = hybrid_groups(g, u, q.device, plan.timeout)
    members = [[list(rank_chunks(plan.layout, r * u + b, g.world)) for b in range(u)] for r in range(n)]
    row_ids = [sorted(c for cs in m for c in cs) for m in members]  # each row's chunks, ascending
    ring = KVRing(
        kv_group=kv_group, grad_group=grad_group, rank=g.rank // u, world=n,
        chunks=tuple(tuple(ids) for ids in row_ids), causal=plan.causal, scale=plan.scale,
        kernel=plan.kernel, timeout=plan.timeout,
    )
    return HeadShards(ug, members[g.rank // u], u, ring, plan.timeout)


hybrid_pass = head_sharded_pass(_shards, kv_ring_forward, kv_ring_backward,
                                lambda q, k, world: runtime_degree(world, q.shape[2], k.shape[2]))
"""``algorithm="hybrid"``: q (B, S_l, H, D), k/v (B, S_l, H_kv, D) shards -> (B, S_l, H, D)."""
