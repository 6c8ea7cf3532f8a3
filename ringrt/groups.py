"""Process groups used by the ring schedules.

TokenRing keeps its two traffic directions on two process groups over the same ranks (a "q" group
for queries travelling one way and an "out" group for partial results travelling back) so neither
queues behind the other. They are created once per base group and cached.
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
        q = dist.new_group(list(ranks), use_local_synchronization=True, group_desc="ringrt_q")
        out = dist.new_group(list(ranks), use_local_synchronization=True, group_desc="ringrt_out")
        rg = _CACHE[key] = RingGroups(g, q, out, rank, world)
    return rg


def clear_cache() -> None:
    """Forget cached groups (call after destroy_process_group before re-initialising)."""
    _CACHE.clear()
