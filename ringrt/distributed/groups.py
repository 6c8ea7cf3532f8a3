"""Process groups used by the ring schedules.

Every ring schedule has two streams of traffic in flight at once, so it gets two *lanes*: process
groups over the same ranks as the base group, each its own communicator (and stream, on NCCL), so
neither stream queues behind the other. Who uses them for what:

* TokenRing: queries on lane 0 (each owner's straight to the rank visiting them next), partial
  results on lane 1 (back to their owner); in the relay topology one head half travels each way,
  lane 0 downwards and lane 1 upwards;
* KV-ring: K/V on lane 0, dK/dV on lane 1 (both r -> r+1, the gradients one step behind);
* Λ-mask pass: the halo exchanges on lane 0, the global-token relay on lane 1;
* hybrid: Ulysses rows and two column rings (a "grid"; u = 1 is the KV-ring on the two lanes).

The lanes are named for being two, not for a direction or a payload: the KV-ring sends both its
streams the same way. A third group over the same ranks, the *agreement lane*, carries only the
input agreements of ``ringrt.attention`` after the first call (``agree.py``): a rank that alone
starts an agreement then waits there until its timeout, and can never be matched with another
rank's schedule traffic. NCCL ignores P2P tags and runs a communicator's operations in order, so
channels in flight at the same time must never share a communicator there (see Note [NCCL and gloo]
in ``comm.py``).

For the default group the lanes are created on first use with ``dist.new_group`` over all ranks,
which every rank reaches because every rank is inside the same ``ringrt.attention`` call.
``new_group`` waits for every rank up to the process group's own timeout (30 minutes, say), so a
bounded rendezvous (:func:`ringrt.distributed.comm.rendezvous`) goes first: a rank that gave up on
the input agreement just before (its timeout ran out while another rank was late) then makes every
rank raise within ringrt's timeout instead of leaving the late one blocked.

A subgroup (a sequence-parallel group of a data x sequence mesh) cannot do that — ``new_group`` is
collective over the whole world — so its dedicated groups are made where the subgroups are made, on
every rank of the world: :func:`new_subgroups` (what ``ringrt.model.parallel.mesh`` uses), or
``dist.new_group`` twice plus :func:`register` for subgroups made some other way. Without them a
subgroup's channels share the subgroup itself, kept apart by per-channel tags: fine on gloo; on NCCL
:func:`nccl_problem` rejects it, on every rank before any transfer. The hybrid's grids on the default
group, or on a gloo subgroup without registered grids, are made on first use by :func:`grid_groups`.

Groups are created with ``use_local_synchronization`` only for a gloo subgroup's own grid row and
column (:func:`grid_groups`), and never two over the same ranks: such a group's name hashes the rank
list and the number of groups the process already has, so two ranks with different histories could
pair one group's connections with another's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from . import agree as agreements
from . import comm

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

Grid = tuple  # (Ulysses row group, K/V column group, dK/dV column group) of one rank
Lanes = tuple  # (lane 0, lane 1): two groups over the base group's ranks, or (None, None) on one process


@dataclass(frozen=True, slots=True)
class RingGroups:
    """The base group, its two lanes and the hybrid grids. Groups None on a single process.

    ``dedicated``: the lanes are groups of their own (False: both are the base group, channels kept
    apart by tags, gloo only). ``grids``: Ulysses degree u -> this rank's :data:`Grid`. ``agree``:
    the agreement lane (see the module note), None where there is none (agreements then run on the
    base group, every call).
    """

    base: dist.ProcessGroup | None
    lanes: Lanes
    rank: int
    world: int
    dedicated: bool = True
    grids: Mapping[int, Grid] = field(default_factory=dict)
    agree: dist.ProcessGroup | None = None


_CACHE: dict[tuple, RingGroups] = {}
_GRID_CACHE: dict[tuple, Grid] = {}


def base_group(group: dist.ProcessGroup | DeviceMesh | None) -> tuple[dist.ProcessGroup | None, int, int]:
    """(group, rank, world) with None meaning the default group; (None, 0, 1) without distributed.

    ``group`` is what every public entry point's ``group=`` accepts: None, a ``ProcessGroup``, or a
    1-D ``torch.distributed.device_mesh.DeviceMesh`` (a 1-D mesh, or a slice ``mesh["sp"]`` of a
    larger one), which means its process group. ``ValueError`` for a mesh of more dimensions (naming
    them) or anything else (naming its type).
    """
    group = process_group(group)
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return None, 0, 1
    g = group if group is not None else dist.group.WORLD
    return g, dist.get_rank(g), dist.get_world_size(g)


def process_group(group) -> dist.ProcessGroup | None:
    """The process group that ``group=`` names: itself for None or a ``ProcessGroup``, ``get_group()``
    of a 1-D ``DeviceMesh``.

    ``mesh["sp"]`` builds a new ``DeviceMesh`` object on every call, but its ``get_group()`` looks the
    group up by name in torch's registry and returns the same ``ProcessGroup`` each time, so the
    per-group caches here (:func:`ring_groups`, keyed by the group's identity) hit on every call.
    """
    if group is None or (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        return group
    mesh_type = _device_mesh_type()
    if mesh_type is not None and isinstance(group, mesh_type):
        if group.ndim != 1:
            names = group.mesh_dim_names
            pick = (f"one of {', '.join(map(repr, names))}" if names else
                    "name the dims with init_device_mesh(..., mesh_dim_names=...) first, or pass mesh.get_group(<i>)")
            raise ValueError(
                f"group is a {group.ndim}-D DeviceMesh (dims {names}, shape {tuple(group.shape)}); the sequence is sharded "
                f"over one dimension of it: pass group=mesh[\"<dim>\"] for that dimension ({pick})"
            )
        return group.get_group()
    kind = type(group)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    raise ValueError(
        f"group must be None (the default group), a torch.distributed.ProcessGroup or a 1-D DeviceMesh "
        f"(e.g. mesh[\"sp\"]); got a value of type {name}"
    )


def _device_mesh_type():
    """``DeviceMesh``, or None on a torch built without distributed."""
    if not dist.is_available():
        return None
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh


def group_name(group: dist.ProcessGroup | DeviceMesh | None) -> str:
    """The name of ``group`` (None: the default group) that :func:`by_name` resolves in this process;
    "" without distributed. A string, so that it can be an argument of a custom op. ``group`` may
    be a 1-D DeviceMesh (see :func:`process_group`)."""
    group = process_group(group)
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return ""
    return (group if group is not None else dist.group.WORLD).group_name


def by_name(name: str) -> tuple[dist.ProcessGroup | None, int, int]:
    """(group, rank, world) of the group called ``name`` here (see :func:`group_name`); (None, 0, 1) for ""."""
    if not name:
        return None, 0, 1
    g = c10d._resolve_process_group(name)
    return g, dist.get_rank(g), dist.get_world_size(g)


def _key(g: dist.ProcessGroup) -> tuple:
    return id(g), tuple(dist.get_process_group_ranks(g))


def cached(group: dist.ProcessGroup | None) -> RingGroups | None:
    """The :class:`RingGroups` of ``group`` if they exist already (no communication), else None."""
    g, _, world = base_group(group)
    return None if world == 1 else _CACHE.get(_key(g))


def ring_groups(group: dist.ProcessGroup | None, *, timeout_s: float | None = None, device=None) -> RingGroups:
    """The cached :class:`RingGroups` for ``group`` (default group when None). Creating them (the
    first call on the default group) waits at most ``timeout_s`` seconds (None: the default) on gloo
    for every rank to arrive, else raises ``CommTimeout`` / ``CommError``; ``device``: where the
    caller's tensors live (for the rendezvous, see :func:`ringrt.distributed.comm.metadata_device`)."""
    g, rank, world = base_group(group)
    if world == 1:
        return RingGroups(g, (None, None), rank, world)
    key = _key(g)
    rg = _CACHE.get(key)
    if rg is None:
        if g is dist.group.WORLD:  # every rank is here: a collective creation names them alike everywhere
            comm.rendezvous(g, device=device, timeout_s=timeout_s, channel="groups", step="setup of the ring groups")
            lanes = tuple(dist.new_group(list(key[1]), group_desc=f"ringrt_lane{i}") for i in range(2))
            rg = RingGroups(g, lanes, rank, world, agree=dist.new_group(list(key[1]), group_desc="ringrt_agree"))
            # gloo finishes a group's connections on one rank before the others: without this second
            # rendezvous a rank that exits right after could break a peer's creation with a raw error
            comm.rendezvous(g, device=device, timeout_s=timeout_s, channel="groups", step="after setup of the ring groups")
        else:  # an unregistered subgroup: its channels share it, kept apart by tags (gloo only)
            rg = RingGroups(g, (g, g), rank, world, dedicated=False)
        _CACHE[key] = rg
    return rg


def grid_ranks(ranks: Sequence[int], u: int) -> tuple[list[list[int]], list[list[int]]]:
    """(rows, columns) of the hybrid's (len(ranks)/u) x u grid; member i = row i // u, column i % u
    (see Note [Hybrid] in ``schedules/hybrid.py``)."""
    n = len(ranks) // u
    rows = [[ranks[i * u + b] for b in range(u)] for i in range(n)]
    cols = [[ranks[i * u + c] for i in range(n)] for c in range(u)]
    return rows, cols


def _new_grid_groups(ranks: Sequence[int], u: int) -> tuple[list, list, list]:
    """Every row group and both rings of every column of the degree-u grid over ``ranks``, created
    in the same order on every rank that calls it."""
    rows, cols = grid_ranks(ranks, u)
    row_groups = [dist.new_group(r, group_desc="ringrt_ulysses") for r in rows]
    kv_groups = [dist.new_group(c, group_desc="ringrt_ring_kv") for c in cols]
    dkv_groups = [dist.new_group(c, group_desc="ringrt_ring_dkv") for c in cols]
    return row_groups, kv_groups, dkv_groups


def new_grids(ranks: Sequence[int], degrees: Sequence[int]) -> dict[int, Grid]:
    """The hybrid grids over ``ranks`` for each Ulysses degree in ``degrees`` (1 < u < len(ranks),
    dividing it): every row and both column rings, created on every rank of the world in the same
    order. Returns this rank's grids (empty when it is not in ``ranks``)."""
    me = dist.get_rank()
    mine: dict[int, Grid] = {}
    for u in sorted(set(degrees)):
        if not (1 < u < len(ranks) and len(ranks) % u == 0):
            raise ValueError(f"hybrid degree {u} must be a divisor of the group size {len(ranks)} strictly between 1 and it")
        row_groups, kv_groups, dkv_groups = _new_grid_groups(ranks, u)
        if me in ranks:
            i = list(ranks).index(me)
            mine[u] = (row_groups[i // u], kv_groups[i % u], dkv_groups[i % u])
    return mine


def grid_groups(base: dist.ProcessGroup, world: int, rank: int, u: int, device=None, timeout: float | None = None) -> Grid:
    """This rank's (ulysses group, ring K/V group, ring dK/dV group) of the degree-u grid on the
    default group, or on a gloo subgroup without registered grids; created once and cached.

    On the default group every rank creates every row and column group, in the same order, so the
    groups are named alike on all ranks. On a subgroup only the members are present: this rank's
    row and column are created with local synchronisation, and the K/V and dK/dV rings share the
    column group (their channels are kept apart by tags, which only gloo honours: an NCCL subgroup
    needs its grids registered, see :func:`new_subgroups`). Never two local groups over the same
    ranks: their names could pair up differently on different ranks.

    Creation starts with a bounded rendezvous over ``base`` (``timeout`` seconds on gloo, see
    :func:`ringrt.distributed.comm.rendezvous`): ``dist.new_group`` would wait for a missing rank up
    to the process group's own timeout.
    """
    ranks = dist.get_process_group_ranks(base)
    key = (id(base), tuple(ranks), u)
    if key not in _GRID_CACHE:
        rows, cols = grid_ranks(ranks, u)
        my_row, my_col = rank // u, rank % u
        if base is dist.group.WORLD or not comm.is_nccl(base, device):  # (an NCCL subgroup is refused below)
            comm.rendezvous(base, device=device, timeout_s=timeout, channel="groups", step=f"setup of the hybrid grid (u={u})")
        if base is dist.group.WORLD:
            row_groups, kv_groups, dkv_groups = _new_grid_groups(ranks, u)
            _GRID_CACHE[key] = (row_groups[my_row], kv_groups[my_col], dkv_groups[my_col])
        else:
            if comm.is_nccl(base, device):
                raise ValueError(nccl_problem(base, device, hybrid_degree=u) or "hybrid: no grid for this NCCL subgroup")
            row = dist.new_group(rows[my_row], use_local_synchronization=True, group_desc="ringrt_ulysses")
            col = row if rows[my_row] == cols[my_col] else dist.new_group(
                cols[my_col], use_local_synchronization=True, group_desc="ringrt_ring_kv")
            _GRID_CACHE[key] = (row, col, col)
    return _GRID_CACHE[key]


def new_subgroups(rank_lists: Sequence[Sequence[int]], *, hybrid_degrees: Sequence[int] = ()) -> dist.ProcessGroup | None:
    """One process group per rank list, each with its two lanes (and the hybrid grids of
    ``hybrid_degrees``) registered. Collective over the whole world: every rank calls it with the
    same arguments. Returns the group this rank is in (None if none)."""
    me, mine = dist.get_rank(), None
    for ranks in rank_lists:
        ranks = list(ranks)
        base = dist.new_group(ranks, group_desc="ringrt_seq")
        if len(ranks) == 1:  # nothing travels
            mine = base if me in ranks else mine
            continue
        lanes = tuple(dist.new_group(ranks, group_desc=f"ringrt_lane{i}") for i in range(2))
        agree = dist.new_group(ranks, group_desc="ringrt_agree")
        grids = new_grids(ranks, hybrid_degrees)
        if me in ranks:
            mine = base
            register(base, lanes=lanes, grids=grids, agree=agree)
    return mine


def register(group: dist.ProcessGroup | DeviceMesh, *, lanes: Lanes, grids: Mapping[int, Grid] | None = None,
             agree: dist.ProcessGroup | None = None) -> None:
    """Use ``lanes`` (two groups over the same ranks as ``group``, same order) as the lanes of
    ``group``, ``grids`` (Ulysses degree -> this rank's (row, kv, dkv) groups, see
    :func:`new_grids`) for ``algorithm="hybrid"``, and ``agree`` (a third such group, or None) as its
    agreement lane. :func:`new_subgroups` does all of this; call it directly for a subgroup made
    some other way.

    Create the lanes with ``dist.new_group`` on every rank of the world, then call this on the members.
    ``group`` may be a 1-D ``DeviceMesh`` (``mesh["sp"]``): its process group is registered.
    """
    group = process_group(group)
    ranks = tuple(dist.get_process_group_ranks(group))
    if len(lanes) != 2:
        raise ValueError(f"register: lanes must be two groups, got {len(lanes)}")
    named = [(f"lane {i}", sub) for i, sub in enumerate(lanes)] + ([("agree", agree)] if agree is not None else [])
    for name, sub in named:
        if tuple(dist.get_process_group_ranks(sub)) != ranks:
            raise ValueError(f"register: {name} has ranks {dist.get_process_group_ranks(sub)}, "
                             f"the base group {list(ranks)}; they must be the same ranks in the same order")
    subs = [sub for _, sub in named]
    if len({id(sub) for sub in subs}) < len(subs) or group in subs:
        raise ValueError("register: the two lanes and the base group must be three different groups, the agreement lane a "
                         "fourth (NCCL ignores tags: channels sharing a group would match each other's messages)")
    _CACHE[(id(group), ranks)] = RingGroups(group, tuple(lanes), dist.get_rank(group), dist.get_world_size(group),
                                            grids=dict(grids or {}), agree=agree)


def nccl_problem(group: dist.ProcessGroup | None, device, *, hybrid_degree: int | None = None) -> str | None:
    """Why ringrt's channels cannot run over ``group`` for tensors on ``device``, or None.

    Only a subgroup on NCCL can fail: it needs its dedicated lanes (and, for the hybrid with Ulysses
    degree ``hybrid_degree``, that grid), since NCCL ignores the tags that keep channels apart on a
    shared group. Every rank computes the same answer, so it goes into the input agreement and every
    rank raises the same ``ValueError`` before any transfer.
    """
    g, _, world = base_group(group)
    if world == 1 or g is dist.group.WORLD or not comm.is_nccl(g, device):
        return None
    ranks = dist.get_process_group_ranks(g)
    rg = _CACHE.get(_key(g))
    if rg is None or not rg.dedicated:
        return (
            f"group (ranks {ranks}) is a subgroup on NCCL without dedicated direction groups (its two lanes): NCCL ignores "
            f"P2P tags, so ringrt's concurrent channels cannot share one communicator. Create the subgroups with "
            f"ringrt.distributed.groups.new_subgroups(rank_lists) on every rank (ringrt.model.parallel.mesh does), or create two more "
            f"groups over the same ranks with dist.new_group on every rank and call "
            f"ringrt.distributed.groups.register(group, lanes=(a, b))"
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
    """Forget every cached group: lanes, registrations and hybrid grids (call after
    ``destroy_process_group``, before initialising again in the same process)."""
    _CACHE.clear()
    _GRID_CACHE.clear()
    agreements.clear_cache()
