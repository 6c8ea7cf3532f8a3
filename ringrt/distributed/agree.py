"""Input checks for the attention entry points, agreed on by every rank before any P2P starts.

Each rank first checks its own inputs (and its ``timeout``) without raising. Then all ranks exchange
a small vector of (ok flag, shapes, dtype, settings, whether a backward will follow) in one
all_gather. If any rank found a problem, or the ranks disagree, every rank raises the same
``ValueError`` (the problems' texts travel in a second all_gather), so no rank is left waiting on a
peer that gave up. On a single process the local problem is raised directly.

The gathers are ringrt collectives (:func:`ringrt.distributed.comm.collective`): bounded by the timeout on gloo,
and a rank that never arrives, or gave up, is a :class:`~ringrt.distributed.comm.CommTimeout` /
:class:`~ringrt.distributed.comm.CommError` naming this rank, not a hang. A timeout cannot tell every rank the
same story, though: the rank that gave up raises, and a late rank may still receive its summary and
pass. Whatever a passing rank does next is bounded too (a P2P wait, or the bounded rendezvous in
front of group creation, :func:`ringrt.distributed.comm.rendezvous`), so it raises within one more timeout.

Note [agreement cache]
----------------------
``ringrt.attention`` agrees once per signature, not once per call: an agreement that passed is
remembered per group under its :func:`signature` (the compared fields: shapes, dtype, device type,
settings, whether a backward follows, ``return_lse``), and a later call with the same signature
skips the all_gather; the local checks still run on every call (pure Python). A call with a local
problem always agrees, so that every rank raises the same ``ValueError``.

The cost is in what a rank can no longer learn. Every rank must call with the same signature, as
before, but a rank that alone changes it (or alone has a local problem) now runs the agreement while
the others, whose signature is remembered, go straight to the schedule: the rank in the agreement
and the others in their transfers each wait their timeout and raise ``CommTimeout`` (a
``ValueError`` naming the difference needs the others in the agreement too). It is never a wrong
result: a remembered signature is only used where the group has an agreement lane
(``ringrt.distributed.groups``), a group no schedule uses, so a lone rank's agreement is never
matched with another rank's schedule traffic; without one (a subgroup made without
``new_subgroups``), every call agrees.

``RINGRT_AGREE_CACHE=0`` (set on every rank) turns the cache off: every call agrees, as before.
:func:`clear_cache` forgets every signature (``ringrt.distributed.groups.clear_cache`` calls it). At
most ``CACHE_SIZE`` signatures are kept per group, the least recently used dropped first: the same
on every rank of the group, since they all call with the same signatures.
"""

from __future__ import annotations

import math
import os
import sys
from collections import OrderedDict

import torch
import torch.distributed as dist

from . import comm
from ..ops.layout import LAYOUTS, local_chunks

_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "meta")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FIELDS = ("batch", "local_seq", "heads", "kv_heads", "head_dim", "dtype", "device type", "causal",
           "algorithm", "layout", "topology", "softmax_scale", "requires_grad", "return_lse", "documents",
           "document lengths (checksum)")
_HINTS = {
    "requires_grad": " (torch.is_grad_enabled() and any of q, k, v requiring grad: the backward exchanges data "
                     "too, so every rank or none must run it)",
}


def needs_backward(*tensors) -> bool:
    """Whether autograd will run a backward through these inputs (grad mode on, one requires grad)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def local_problem(
    q, k, v, *, causal, algorithm: str, algorithms, layout: str, topology: str, topologies, softmax_scale, world: int
) -> str | None:
    """The first problem with this rank's inputs, as a message, or None."""
    return (
        _tensor_problem(q, k, v)
        or _settings_problem(causal, algorithm, algorithms, layout, topology, topologies, softmax_scale)
        or _shape_problem(q, k, v)
        or _device_problem(q, world)
        or _layout_problem(q, layout, world)
    )


def _tensor_problem(q, k, v) -> str | None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if (problem := _dtensor_problem(name, t)) is not None:
            return problem
        if t.dim() != 4:
            return f"{name} must be 4-D (batch, local_seq, heads, head_dim), got shape {tuple(t.shape)}"
        if t.dtype not in DTYPES:
            return f"{name}.dtype={t.dtype} is not supported; valid: float16, bfloat16, float32, float64"
    return None


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing that module: only a
    program that imported it can hold one, and importing it costs seconds)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def _dtensor_problem(name: str, t: torch.Tensor) -> str | None:
    """Why a ``DTensor`` input is refused, or None for a plain tensor.

    A DTensor's operations communicate by themselves where its placements call for it; mixed with
    ringrt's plain tensors inside the schedules, some ranks fail and others are left waiting on them.
    Only its metadata is read here (placements, mesh shape and names), which every rank holds
    alike: every rank writes the same message, and no DTensor operation runs.
    """
    if not is_dtensor(t):
        return None
    mesh = t.device_mesh
    dims = f"dims {', '.join(map(repr, mesh.mesh_dim_names))}" if mesh.mesh_dim_names else "unnamed dims"
    return (
        f"{name} is a DTensor (placements {tuple(t.placements)!r} over a DeviceMesh with {dims}, "
        f"shape {tuple(mesh.shape)}); ringrt takes each rank's shard as a plain tensor and does its own communication. "
        f"Pass {name}.to_local() of a tensor sharded over the sequence dim only (Shard(1) on the mesh dimension you pass as "
        f"group=, e.g. group=mesh[\"sp\"]): its local pieces are layout='contiguous', so pass layout='contiguous' (the "
        f"causal default is 'zigzag'); or cut the full tensor with ringrt.shard(x, layout=..., group=...)"
    )


def _settings_problem(causal, algorithm: str, algorithms, layout: str, topology: str, topologies, softmax_scale) -> str | None:
    if algorithm not in algorithms:
        return f"algorithm={algorithm!r} is not a known algorithm; valid: {', '.join(algorithms)}"
    if layout not in LAYOUTS:
        return f"layout={layout!r} is not a known layout; valid: {', '.join(LAYOUTS)}"
    if topology not in topologies:
        return f"topology={topology!r} is not a known topology; valid: {', '.join(topologies)}"
    if not isinstance(causal, bool):
        return f"causal={causal!r} must be True or False"
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale) and softmax_scale > 0):
        return f"softmax_scale={softmax_scale!r} must be a positive finite number or None (1/sqrt(head_dim))"
    return None


def _shape_problem(q, k, v) -> str | None:
    if k.shape != v.shape:
        return f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}"
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and local_seq (dims 0 and 1)"
    if q.shape[3] != k.shape[3]:
        return f"q head_dim={q.shape[3]} and k/v head_dim={k.shape[3]} must be equal"
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        return f"heads={q.shape[2]} must be a positive multiple of kv_heads={k.shape[2]} (GQA/MQA)"
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        return f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if len({q.device, k.device, v.device}) != 1:
        return f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
    return None


def _device_problem(q, world: int) -> str | None:
    if q.device.type == "cuda" and world > 1:  # NCCL runs on the current device: no host sync, one index compare
        from .device import wrong_cuda_device

        return wrong_cuda_device(q.device, torch.cuda.current_device()) or None
    return None


def _layout_problem(q, layout: str, world: int) -> str | None:
    n = local_chunks(layout)
    if q.shape[1] == 0 or q.shape[1] % n:
        return (
            f"local_seq={q.shape[1]} cannot be used with layout={layout!r}: it cuts each rank's shard into {n} "
            f"equal chunks, so the full sequence length must be a multiple of {n * world} (= {n} x world size {world}). "
            f"Pad the full sequence with ringrt.pad_to_multiple(x, {n * world}, dim=1) before ringrt.shard "
            f"(exact under causal attention: padding at the end is never seen by real tokens)"
        )
    return None


def _meta(q, k, causal, algorithm, algorithms, layout, topology, topologies, softmax_scale, backward: bool, return_lse: bool,
          documents: tuple[int, int] = (0, 0), *, ok: bool) -> list[float]:
    dims = list(q.shape[:2]) + [q.shape[2], k.shape[2], q.shape[3]] if ok else [-1] * 5
    return [
        1.0 if ok else 0.0, *map(float, dims),
        float(DTYPES.index(q.dtype)) if ok else -1.0,
        float(_DEVICE_TYPES.index(q.device.type)) if ok and q.device.type in _DEVICE_TYPES else -1.0,
        float(bool(causal)) if ok else -1.0,
        float(list(algorithms).index(algorithm)) if ok else -1.0,
        float(LAYOUTS.index(layout)) if ok else -1.0,
        float(list(topologies).index(topology)) if ok else -1.0,
        float(softmax_scale) if (ok and softmax_scale is not None) else -1.0,
        float(backward) if ok else -1.0,
        float(return_lse) if ok else -1.0,
        *((float(x) for x in documents) if ok else (-1.0, -1.0)),
    ]


def agree(group: dist.ProcessGroup | None, rank: int, world: int, problem: str | None, meta_args: tuple, what: str, timeout_s: float, device) -> None:
    """Raise ``ValueError`` on every rank if any rank has a problem or the ranks disagree.

    Uses one all_gather of a few numbers on ``group`` (None on a single process), on the CPU when
    the group carries CPU tensors (see :func:`ringrt.distributed.comm.metadata_device`). A rank that never
    arrives makes the others raise ``CommTimeout`` after ``timeout_s`` on gloo; on a plain NCCL
    group the wait is the process group's own (its timeout and watchdog). ``meta_args``: (q, k,
    causal, algorithm, algorithms, layout, topology, topologies, softmax_scale, backward, return_lse[,
    documents]), ``documents`` = (count, checksum) of packed documents, (0, 0) without.
    """
    fields = [] if world == 1 else list(zip(_FIELDS, _meta(*meta_args, ok=problem is None)[1:], strict=True))
    agree_fields(group, rank, world, problem, fields, what, timeout_s, device, show=show_field)


CACHE_SIZE = 1024
_AGREED: dict[dist.ProcessGroup, OrderedDict[tuple, None]] = {}  # agreement lane -> its signatures, oldest first


def signature(meta_args: tuple) -> tuple:
    """What :func:`agree` compares for ``meta_args`` of valid inputs, as a hashable key."""
    return tuple(_meta(*meta_args, ok=True))


def cache_enabled() -> bool:
    """Whether agreements are remembered (``RINGRT_AGREE_CACHE``, default on; see Note [agreement cache])."""
    return os.environ.get("RINGRT_AGREE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def agreed(lane: dist.ProcessGroup | None, sig: tuple) -> bool:
    """Whether the ranks of ``lane``'s group already agreed on ``sig`` (no communication)."""
    seen = _AGREED.get(lane) if lane is not None and cache_enabled() else None
    if seen is None or sig not in seen:
        return False
    seen.move_to_end(sig)
    return True


def remember(lane: dist.ProcessGroup | None, sig: tuple) -> None:
    """Record that the ranks of ``lane``'s group agreed on ``sig`` (nothing without a lane)."""
    if lane is None or not cache_enabled():
        return
    seen = _AGREED.setdefault(lane, OrderedDict())
    seen[sig] = None
    seen.move_to_end(sig)
    while len(seen) > CACHE_SIZE:
        seen.popitem(last=False)


def clear_cache() -> None:
    """Forget every agreed signature: the next call of each signature agrees again (on every rank: call
    it on all of them, or on none)."""
    _AGREED.clear()


def agree_fields(
    group: dist.ProcessGroup | None, rank: int, world: int, problem: str | None, fields: list[tuple[str, float]], what: str, timeout_s: float, device, show=None
) -> None:
    """:func:`agree` for any named numeric settings: raise the same ``ValueError`` on every rank if any
    rank has a problem or the ranks' ``fields`` values differ (values matter only where problem is None).
    ``show(name, value)`` formats a value for the message. ``group``, ``rank``, ``world`` as from
    :func:`ringrt.distributed.groups.base_group` (call it before creating any ring groups: that needs every rank).
    ``timeout_s``: seconds each gather may wait on gloo (a valid one: the default when the caller's
    own was invalid, which is then the problem)."""
    g = group
    if world == 1:
        if problem:
            raise ValueError(f"{what}: {problem}")
        return
    # Host-side metadata stays on the CPU over a group that carries CPU tensors (gloo, or the gloo
    # half of "cpu:gloo,cuda:nccl"): no device sync. A plain NCCL group needs it on the device;
    # reading the rows back is then the one device sync of the agreement.
    dev = comm.metadata_device(g, device)
    text = (problem or "").encode()
    # row: ok flag, length of the problem's text (not compared), the fields
    meta = torch.tensor([1.0 if problem is None else 0.0, float(len(text)), *(float(v) for _, v in fields)],
                        dtype=torch.float64, device=dev)
    gathered = [torch.empty_like(meta) for _ in range(world)]
    _gather(lambda: dist.all_gather(gathered, meta, group=g, async_op=True), g, dev, timeout_s, what, rank, world,
            "every rank's input summary")
    rows = torch.stack(gathered).cpu().tolist()
    bad = [r for r, row in enumerate(rows) if row[0] == 0.0]
    if bad:
        msgs = _gather_texts(text, [int(row[1]) for row in rows], g, dev, timeout_s, what, rank, world)
        if len(set(msgs[r] for r in bad)) == 1:
            where = f"rank {bad[0]}" if len(bad) == 1 else f"ranks {', '.join(map(str, bad))}"
            raise ValueError(f"{what}: invalid input on {where}: {msgs[bad[0]]}")
        detail = "; ".join(f"rank {r}: {msgs[r]}" for r in bad)
        raise ValueError(f"{what}: invalid input on ranks {', '.join(map(str, bad))}: {detail}")
    for i, (name, _) in enumerate(fields, start=2):
        vals = [row[i] for row in rows]
        if len(set(vals)) > 1:
            shown = ", ".join(f"rank {r}: {show(name, val) if show else val}" for r, val in enumerate(vals))
            raise ValueError(f"{what}: the ranks disagree on {name} ({shown}){_HINTS.get(name, '')}; every rank must "
                             f"call it with the same settings and shard shapes")


def _gather(start, g, dev, timeout_s, what, rank, world, payload: str) -> None:
    """One all_gather of the agreement, as a ringrt collective (bounded; failures name this rank)."""
    comm.collective(
        f"the all_gather of {payload}", start, group=g, device=dev, timeout_s=timeout_s, channel="agree",
        where_text=f"{what}: rank {rank} (of {world}), checking the inputs with the other ranks",
        who="did every rank of the group call it?",
    )


def _gather_texts(text: bytes, lengths: list[int], g, dev, timeout_s, what, rank, world) -> list[str]:
    """Every rank's problem text (UTF-8 bytes of ``lengths[r]``), padded to one size: one all_gather."""
    n = max(max(lengths), 1)
    buf = torch.zeros(n, dtype=torch.uint8)
    if text:
        buf[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    buf = buf.to(dev)
    parts = [torch.empty_like(buf) for _ in range(world)]
    _gather(lambda: dist.all_gather(parts, buf, group=g, async_op=True), g, dev, timeout_s, what, rank, world,
            "the ranks' problems")
    return [bytes(p[:m].cpu().tolist()).decode("utf-8", "replace") for p, m in zip(parts, lengths, strict=True)]


def show_field(name: str, val: float):
    """A gathered field value as the user wrote it (for the disagreement message)."""
    if name == "dtype":
        return str(DTYPES[int(val)]) if 0 <= val < len(DTYPES) else val
    if name in ("softmax_scale", "block_size") and val < 0:
        return "None"
    if name in ("causal", "requires_grad", "return_lse"):
        return bool(val)
    return int(val) if float(val).is_integer() else val
