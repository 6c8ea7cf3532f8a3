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

The degree u is :func:`hybrid_degree`: ``RINGRT_ULYSSES_DEGREE`` if set, else the largest u < W that
divides W, fits the heads (see :func:`ulysses.ulysses_problem`) and the ranks per node
(``LOCAL_WORLD_SIZE``); u = 1 is a plain KV-ring, u = W plain Ulysses.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..distributed import comm
from ..distributed.groups import grid_ranks, nccl_problem
from ..ops.layout import rank_chunks
from .ring import KVRing, KVRingAttention
from .ulysses import from_heads, replicate_kv, to_heads, ulysses_problem

_CACHE: dict[tuple, tuple] = {}


def hybrid_degree(world: int, heads: int, kv_heads: int, ranks_per_node: int | None = None) -> int:
    """The Ulysses degree u of the hybrid for this problem (see the module note)."""
    env = os.environ.get("RINGRT_ULYSSES_DEGREE")
    if env:
        u = int(env)
        if u < 1 or world % u:
            raise ValueError(f"RINGRT_ULYSSES_DEGREE={env} must be a divisor of the world size {world}")
        return u
    per_node = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    ok = [u for u in range(1, world + 1) if world % u == 0 and u <= per_node and ulysses_problem(heads, kv_heads, u) is None]
    proper = [u for u in ok if u < world]
    return max(proper) if proper else max(ok)


def grid_groups(base: dist.ProcessGroup, world: int, rank: int, u: int, device=None, timeout: float | None = None) -> tuple:
    """(ulysses group, ring K/V group, ring dK/dV group) of this rank on the default group, or on a
    gloo subgroup without registered grids; created once and cached.

    On the default group every rank creates every row and column group, in the same order, so the
    groups are named alike on all ranks. On a subgroup only the members are present: this rank's
    row and column are created with local synchronisation, and the K/V and dK/dV rings share the
    column group (their channels are kept apart by tags, which only gloo honours: an NCCL subgroup
    needs its grids registered, see ``ringrt.distributed.groups.new_subgroups``). Never two local groups over
    the same ranks: their names could pair up differently on different ranks (see ``ringrt.distributed.groups``).

    Creation starts with a bounded rendezvous over ``base`` (``timeout`` seconds on gloo, see
    :func:`ringrt.distributed.comm.rendezvous`): ``dist.new_group`` would wait for a missing rank up to the
    process group's own timeout.
    """
    ranks = dist.get_process_group_ranks(base)
    key = (id(base), tuple(ranks), u)
    if key not in _CACHE:
        rows, cols = grid_ranks(ranks, u)
        my_row, my_col = rank // u, rank % u
        if base is dist.group.WORLD or not comm.is_nccl(base, device):  # (an NCCL subgroup is refused below)
            comm.rendezvous(base, device=device, timeout_s=timeout, channel="groups", step=f"setup of the hybrid grid (u={u})")
        if base is dist.group.WORLD:
            row_groups = [dist.new_group(r, group_desc="ringrt_ulysses") for r in rows]
            kv_groups = [dist.new_group(c, group_desc="ringrt_ring_kv") for c in cols]
            dkv_groups = [dist.new_group(c, group_desc="ringrt_ring_dkv") for c in cols]
            _CACHE[key] = (row_groups[my_row], kv_groups[my_col], dkv_groups[my_col])
        else:
            if comm.is_nccl(base, device):
                raise ValueError(nccl_problem(base, device, hybrid_degree=u) or "hybrid: no grid for this NCCL subgroup")
            row = dist.new_group(rows[my_row], use_local_synchronization=True, group_desc="ringrt_ulysses")
            col = row if rows[my_row] == cols[my_col] else dist.new_group(
                cols[my_col], use_local_synchronization=True, group_desc="ringrt_ring_kv")
            _CACHE[key] = (row, col, col)
    return _CACHE[key]


def hybrid_groups(g, u: int, device, timeout: float | None = None) -> tuple:
    """(ulysses group, K/V group, dK/dV group) of this rank for degree ``u`` over ``g``
    (:class:`ringrt.distributed.groups.RingGroups`); None where that part does not run. u = 1 is a KV-ring
    over the whole group (its direction groups); u = W is Ulysses over the whole group (the base);
    otherwise a registered grid, or :func:`grid_groups`."""
    n = g.world // u
    if g.world == 1:
        return None, None, None
    if u == 1:
        return None, g.q, g.out
    if n == 1:
        return g.base, None, None
    if u in g.grids:
        return g.grids[u]
    return grid_groups(g.base, g.world, g.rank, u, device, timeout)


def clear_cache() -> None:
    """Forget cached groups (call after destroy_process_group before re-initialising)."""
    _CACHE.clear()


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> torch.Tensor:
    """``algorithm="hybrid"``: q (B, S_l, H, D), k/v (B, S_l, H_kv, D) shards -> (B, S_l, H, D)."""
    g = plan.groups
    u = hybrid_degree(g.world, q.shape[2], k.shape[2])
    problem = ulysses_problem(q.shape[2], k.shape[2], u)
    if problem:
        raise ValueError(f"ringrt.attention(algorithm='hybrid'): {problem} (set RINGRT_ULYSSES_DEGREE)")
    n = g.world // u
    ug, kv_group, grad_group = hybrid_groups(g, u, q.device, plan.timeout)
    members = [[list(rank_chunks(plan.layout, r * u + b, g.world)) for b in range(u)] for r in range(n)]
    row_ids = [sorted(c for cs in m for c in cs) for m in members]  # each row's chunks, ascending
    mine = members[g.rank // u]
    qh, kh, vh = to_heads([q, replicate_kv(k, u), replicate_kv(v, u)], ug, mine, plan.timeout)  # (B, H/u, u*S_l, D)
    ring = KVRing(
        kv_group=kv_group, grad_group=grad_group, rank=g.rank // u, world=n,
        chunks=tuple(tuple(ids) for ids in row_ids), causal=plan.causal, scale=plan.scale,
        kernel=plan.kernel, timeout=plan.timeout,
    )
    out = KVRingAttention.apply(qh, kh, vh, ring)  # (B, H/u, u*S_l, D)
    return from_heads(out, ug, mine, plan.timeout)
