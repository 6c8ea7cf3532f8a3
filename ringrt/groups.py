"""Process groups used by the ring schedules.

TokenRing keeps its two traffic directions on two process groups over the same ranks (a "q" group
for queries travelling one way and an "out" group for partial results travelling back) so neither
queues behind the other (on NCCL each group is its own communicator and stream).

For the default group they are created on first use with ``dist.new_group`` over all ranks, which
every rank reaches because every rank is inside the same ``ringrt.attention`` call. A subgroup
(a sequence-parallel group of a data x sequence mesh) cannot do that — ``new_group`` is collective
over the whole world — so by default both directions share the subgroup itself, their messages kept
apart by per-channel tags (``comm.P2P``). To give a subgroup dedicated direction groups, create them
on every rank of the world and hand them over once with :func:`register`.

Groups are never created with ``use_local_synchronization``: its names hash the rank list and the
number of groups the process already has, so two ranks with different histories can pair one
group's connections with another's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class RingGroups:
    """The base group and the two direction groups. All None on a single process."""

    base: dist.ProcessGroup | None
    q: dist.ProcessGroup | None
    out: dist.ProcessGroup | None
    rank: int
    world: int


_CACHE: dict[tuple, RingGroups] = {}


def base_group(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, int, int]:
    """(group, rank, world) with None meaning the default group; (None, 0, 1) without distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return None, 0, 1
    g = group if group is not None else dist.group.WORLD
    return g, dist.get_rank(g), dist.get_world_size(g)


def ring_groups(group: dist.ProcessGroup | None) -> RingGroups:
    """The cached :class:`RingGroups` for ``group`` (default group when None)."""
    g, rank, world = base_group(group)
    if world == 1:
        return RingGroups(g, None, None, rank, world)
    ranks = tuple(dist.get_process_group_ranks(g))
    key = (id(g), ranks)
    rg = _CACHE.get(key)
    if rg is None:
        if g is dist.group.WORLD:  # every rank is here: a collective creation names them alike everywhere
            q = dist.new_group(list(ranks), group_desc="ringrt_q")
            out = dist.new_group(list(ranks), group_desc="ringrt_out")
        else:
            q = out = g
        rg = _CACHE[key] = RingGroups(g, q, out, rank, world)
    return rg


def register(group: dist.ProcessGroup, *, q: dist.ProcessGroup, out: dist.ProcessGroup) -> None:
    """Use ``q`` and ``out`` (same ranks, same order as ``group``) as the direction groups of ``group``.

    Create them with ``dist.new_group`` on every rank of the world, then call this on the members.
    """
    ranks = tuple(dist.get_process_group_ranks(group))
    for name, sub in (("q", q), ("out", out)):
        if tuple(dist.get_process_group_ranks(sub)) != ranks:
            raise ValueError(f"register: the {name} group has ranks {dist.get_process_group_ranks(sub)}, "
                             f"the base group {list(ranks)}; they must be the same ranks in the same order")
    _CACHE[(id(group), ranks)] = RingGroups(group, q, out, dist.get_rank(group), dist.get_world_size(group))


def clear_cache() -> None:
    """Forget cached groups (call after destroy_process_group before re-initialising)."""
    _CACHE.clear()
