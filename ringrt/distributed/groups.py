"""Process groups used by the ring schedules.

TokenRing keeps its two traffic directions on two process groups over the same ranks (a "q" group
for queries travelling one way and an "out" group for partial results travelling back) so neither
queues behind the other (on NCCL each group is its own communicator and stream). The KV-ring runs
K/V on the first and dK/dV on the second; the Λ-mask pass its halo exchanges on the first and the
global-token relay on the second; the hybrid adds Ulysses rows and two column rings (a "grid").

NCCL ignores P2P tags and runs a communicator's operations in order, so channels in flight at the
same time must never share a communicator there (see Note [NCCL and gloo] in ``comm.py``).

For the default group the direction groups are created on first use with ``dist.new_group`` over
all ranks, which every rank reaches because every rank is inside the same ``ringrt.attention``
call. ``new_group`` waits for every rank up to the process group's own timeout (30 minutes, say),
so a bounded rendezvous (:func:`ringrt.distributed.comm.rendezvous`) goes first: a rank that gave up on the
input agreement just before (its timeout ran out while another rank was late) then makes every
rank raise within ringrt's timeout instead of leaving the late one blocked.

A subgroup (a sequence-parallel group of a data x sequence mesh) cannot do that — ``new_group`` is
collective over the whole world — so its dedicated groups are made where the
subgroups are made, on every rank of the world: :func:`new_subgroups` (what
``ringrt.model.parallel.mesh`` uses), or ``dist.new_group`` twice plus :func:`register`. Without
them a subgroup's channels share the subgroup itself, kept apart by per-channel tags: fine on gloo;
on NCCL :func:`nccl_problem` rejects it, on every rank before any transfer.

Groups are never created with ``use_local_synchronization`` here: its names hash the rank list and
the number of groups the process already has, so two ranks with different histories can pair one
group's connections with another's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch.distributed as dist

from . import comm

Grid = tuple  # (Ulysses row group, K/V column group, dK/dV column group) of one rank


@dataclass(frozen=True, slots=True)
class RingGroups:
    """The base group, the two direction groups and the hybrid grids. Groups None on a single process.

    ``dedicated``: q and out are groups of their own (False: both are the base group, channels
    kept apart by tags, gloo only). ``grids``: Ulysses degree u -> this rank's :data:`Grid`.
    """

    base: dist.ProcessGroup | None
    q: dist.ProcessGroup | None
    out: dist.ProcessGroup | None
    rank: int
    world: int
    dedicated: bool = True
    grids: Mapping[int, Grid] = field(default_factory=dict)


_CACHE: dict[tuple, RingGroups] = {}


def base_group(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, int, int]:
    """(group, rank, world) with None meaning the default group; (None, 0, 1) without distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return None, 0, 1
    g = group if group is not None else dist.group.WORLD
    return g, dist.get_rank(g), dist.get_world_size(g)


def _key(g: dist.ProcessGroup) -> tuple:
    return id(g), tuple(dist.get_process_group_ranks(g))


def ring_groups(group: dist.ProcessGroup | None, *, timeout_s: float | None = None, device=None) -> RingGroups:
    """The cached :class:`RingGroups` for ``group`` (default group when None). Creating them (the
    first call on the default group) waits at most ``timeout_s`` seconds (None: the default) on gloo
    for every rank to arrive, else raises ``CommTimeout`` / ``CommError``; ``device``: where the
    caller's tensors live (for the rendezvous, see :func:`ringrt.distributed.comm.metadata_device`)."""
    g, rank, world = base_group(group)
    if world == 1:
        return RingGroups(g, None, None, rank, world)
    key = _key(g)
    rg = _CACHE.get(key)
    if rg is None:
        if g is dist.group.WORLD:  # every rank is here: a collective creation names them alike everywhere
            comm.rendezvous(g, device=device, timeout_s=timeout_s, channel="groups", step="setup of the ring groups")
            q = dist.new_group(list(key[1]), group_desc="ringrt_q")
            out = dist.new_group(list(key[1]), group_desc="ringrt_out")
            rg = RingGroups(g, q, out, rank, world)
        else:  # an unregistered subgroup: its channels share it, kept apart by tags (gloo only)
            rg = RingGroups(g, g, g, rank, world, dedicated=False)
        _CACHE[key] = rg
    return rg


def grid_ranks(ranks: Sequence[int], u: int) -> tuple[list[list[int]], list[list[int]]]:
    """(rows, columns) of the hybrid's (len(ranks)/u) x u grid; member i = row i // u, column i % u
    (see Note [Hybrid] in ``schedules/hybrid.py``)."""
    n = len(ranks) // u
    rows = [[ranks[i * u + b] for b in range(u)] for i in range(n)]
    cols = [[ranks[i * u + c] for i in range(n)] for c in range(u)]
    return rows, cols


def new_grids(ranks: Sequence[int], degrees: Sequence[int]) -> dict[int, Grid]:
    """The hybrid grids over ``ranks`` for each Ulysses degree in ``degrees`` (1 < u < len(ranks),
    dividing it): every row and both column rings, created on every rank of the world in the same
    order. Returns this rank's grids (empty when it is not in ``ranks``)."""
    me = dist.get_rank()
    mine: dict[int, Grid] = {}
    for u in sorted(set(degrees)):
        if not (1 < u < len(ranks) and len(ranks) % u == 0):
            raise ValueError(f"hybrid degree {u} must be a divisor of the group size {len(ranks)} strictly between 1 and it")
        rows, cols = grid_ranks(ranks, u)
        row_groups = [dist.new_group(r, group_desc="ringrt_ulysses") for r in rows]
        kv_groups = [dist.new_group(c, group_desc="ringrt_ring_kv") for c in cols]
        dkv_groups = [dist.new_group(c, group_desc="ringrt_ring_dkv") for c in cols]
        if me in ranks:
            i = list(ranks).index(me)
            mine[u] = (row_groups[i // u], kv_groups[i % u], dkv_groups[i % u])
    return mine


def new_subgroups(rank_lists: Sequence[Sequence[int]], *, hybrid_degrees: Sequence[int] = ()) -> dist.ProcessGroup | None:
    """One process group per rank list, each with its dedicated direction groups (and the hybrid
    grids of ``hybrid_degrees``) registered. Collective over the whole world: every rank calls it
    with the same arguments. Returns the group this rank is in (None if none)."""
    me, mine = dist.get_rank(), None
    for ranks in rank_lists:
        ranks = list(ranks)
        base = dist.new_group(ranks, group_desc="ringrt_seq")
        if len(ranks) == 1:  # nothing travels
            mine = base if me in ranks else mine
            continue
        q = dist.new_group(ranks, group_desc="ringrt_q")
        out = dist.new_group(ranks, group_desc="ringrt_out")
        grids = new_grids(ranks, hybrid_degrees)
        if me in ranks:
            mine = base
            register(base, q=q, out=out, grids=grids)
    return mine


def register(group: dist.ProcessGroup, *, q: dist.ProcessGroup, out: dist.ProcessGroup, grids: Mapping[int, Grid] | None = None) -> None:
    """Use ``q`` and ``out`` (same ranks, same order as ``group``) as the direction groups of
    ``group``, and ``grids`` (Ulysses degree -> this rank's (row, kv, dkv) groups, see
    :func:`new_grids`) for ``algorithm="hybrid"``.

    Create them with ``dist.new_group`` on every rank of the world, then call this on the members.
    """
    ranks = tuple(dist.get_process_group_ranks(group))
    for name, sub in (("q", q), ("out", out)):
        if tuple(dist.get_process_group_ranks(sub)) != ranks:
            raise ValueError(f"register: the {name} group has ranks {dist.get_process_group_ranks(sub)}, "
                             f"the base group {list(ranks)}; they must be the same ranks in the same order")
    if q is out or group in (q, out):
        raise ValueError("register: q, out and the base group must be three different groups (NCCL ignores tags: "
                         "channels sharing a group would match each other's messages)")
    _CACHE[(id(group), ranks)] = RingGroups(group, q, out, dist.get_rank(group), dist.get_world_size(group),
                                            grids=dict(grids or {}))


def nccl_problem(group: dist.ProcessGroup | None, device, *, hybrid_degree: int | None = None) -> str | None:
    """Why ringrt's channels cannot run over ``group`` for tensors on ``device``, or None.

    Only a subgroup on NCCL can fail: it needs dedicated direction groups (and, for the hybrid with
    Ulysses degree ``hybrid_degree``, that grid), since NCCL ignores the tags that keep channels
    apart on a shared group. Every rank computes the same answer, so it goes into the input
    agreement and every rank raises the same ``ValueError`` before any transfer.
    """
    g, _, world = base_group(group)
    if world == 1 or g is dist.group.WORLD or not comm.is_nccl(g, device):
        return None
    ranks = dist.get_process_group_ranks(g)
    rg = _CACHE.get(_key(g))
    if rg is None or not rg.dedicated:
        return (
            f"group (ranks {ranks}) is a subgroup on NCCL without dedicated direction groups: NCCL ignores P2P tags, so "
            f"ringrt's concurrent channels cannot share one communicator. Create the subgroups with "
            f"ringrt.distributed.groups.new_subgroups(rank_lists) on every rank (ringrt.model.parallel.mesh does), or create two more "
            f"groups over the same ranks with dist.new_group on every rank and call ringrt.distributed.groups.register(group, q=..., out=...)"
        )
    u = hybrid_degree
    if u is not None and 1 < u < world and u not in rg.grids:
        return (
            f"algorithm='hybrid' with Ulysses degree {u} on an NCCL subgroup (ranks {ranks}) needs that grid's groups, "
            f"created on every rank: ringrt.distributed.groups.new_subgroups(rank_lists, hybrid_degrees=[{u}]) (or "
            f"ringrt.model.parallel.mesh(..., hybrid_degrees=[{u}])); registered degrees: {sorted(rg.grids) or 'none'}"
        )
    return None


def clear_cache() -> None:
    """Forget cached groups (call after destroy_process_group before re-initialising)."""
    _CACHE.clear()
