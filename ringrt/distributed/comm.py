"""All point-to-point traffic of ringrt goes through this module.

A :class:`P2P` channel wraps one process group. ``post`` starts non-blocking sends and receives of
flat byte messages and returns a :class:`Pending`; ``Pending.wait`` finishes them, or raises
:class:`CommTimeout` (a peer did not complete in time) or :class:`CommError` (any other failure: a
closed connection, an NCCL error) naming this rank, the peer(s), the channel and the step, so a
peer that never sends is an error instead of a hang. Collectives (the input agreement, all-gather,
all-to-all, the loss all-reduce, ...) go through :func:`collective`, which finishes them the same
way and turns their failures into the same errors; :func:`failure` is the one place that words them.

Timeouts are positive finite seconds (:func:`resolve_timeout`; None is ``RINGRT_P2P_TIMEOUT`` or
300); there is no "wait forever". A failure is called a timeout only when the wait really ran out;
a closed connection says so, whenever it happens.

Every message is one uint8 tensor: several tensors of mixed dtypes (an fp16 block output and its
fp32 log-sum-exp, say) are packed into one buffer so each transfer costs one operation.

Each channel counts what it moves (bytes and operations, sent and received) into per-process
counters that tests and benchmarks read with :func:`stats` and clear with :func:`reset_stats`;
collectives issued elsewhere add their traffic with :func:`count`.

Note [NCCL and gloo]
--------------------
The two backends want different things, and every decision between them goes through
:func:`is_nccl` (which backend carries tensors of a device over a group) so tests can drive the
NCCL path on CPU through a fake process group:

* Waiting. On NCCL ``work.wait()`` without a timeout only makes the current CUDA stream wait for the
  transfer (stream-ordered; the host thread runs on), while ``work.wait(timeout)`` busy-polls the
  host thread until the transfer is done and aborts the communicator when it times out. So on NCCL
  :func:`wait_work` never passes a timeout: hangs are caught by the process group's own timeout
  (``init_process_group(timeout=...)``) and its watchdog. On gloo the work is host-side anyway and
  the channel's timeout applies (``timeout`` / ``RINGRT_P2P_TIMEOUT``).
* Batching. On NCCL a step's sends and receives go out as ONE ``batch_isend_irecv`` (one NCCL
  group: they progress together, so a ring of ranks that all send before they receive cannot
  deadlock). It returns one coalesced work for the whole batch, so a failure cannot be pinned on one
  peer: the error lists every peer of the batch. On gloo each transfer is a plain isend/irecv with
  its own work (``batch_isend_irecv`` costs ~0.4-0.6 ms more per exchange there), and the receives
  are posted before the sends: gloo often runs an exchange with one peer half-duplex when the send
  is posted first (4.7 MB each way over a 200 mbit veth link: 0.20-0.39 s send-first, mostly ~0.34 s;
  0.197 s receive-first, the full-duplex time); posting the receive first lets both directions of
  the link move at once (the KV-ring at W = 2 over such a link: 1.29 s -> 0.82 s fwd+bwd).
* Tags. NCCL ignores P2P tags: two channels on one communicator would match each other's messages
  by order alone, and a receive queued on a communicator blocks every later operation on it. Every
  channel that is in flight at the same time as another must therefore have its own process group
  (``ringrt.distributed.groups``); the per-channel tag below only separates channels that share a gloo group.
* Metadata. Small host-side agreements (``validate.agree``) run on CPU tensors over a group that
  carries CPU tensors (gloo, or the gloo half of ``cpu:gloo,cuda:nccl``); only a plain NCCL group
  forces them onto the device, at the cost of one device sync (:func:`metadata_device`).
"""

from __future__ import annotations

import datetime
import math
import numbers
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist


def timeout_from_env() -> float:
    """``RINGRT_P2P_TIMEOUT`` in seconds: 300 when unset or blank, else a positive finite number
    (ValueError naming the variable otherwise)."""
    raw = os.environ.get("RINGRT_P2P_TIMEOUT", "")
    if not raw.strip():
        return 300.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"RINGRT_P2P_TIMEOUT={raw!r} must be a positive number of seconds (how long a transfer "
                         f"may wait for a peer; unset: 300)")
    return value


DEFAULT_TIMEOUT_S = timeout_from_env()


def timeout_problem(timeout) -> str | None:
    """Why ``timeout`` (seconds, as the entry points take it) is not valid, or None. Valid: a
    positive finite number, or None for the default (``RINGRT_P2P_TIMEOUT`` or 300)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not (math.isfinite(timeout) and timeout > 0):
        return (f"timeout={timeout!r} must be a positive finite number of seconds or None (the default: "
                f"RINGRT_P2P_TIMEOUT or 300 s)")
    return None


def resolve_timeout(timeout) -> float:
    """Seconds to wait: ``timeout``, or :data:`DEFAULT_TIMEOUT_S` when None; ValueError if invalid."""
    problem = timeout_problem(timeout)
    if problem:
        raise ValueError(problem)
    return DEFAULT_TIMEOUT_S if timeout is None else float(timeout)


Spec = tuple[tuple[int, ...], torch.dtype]


class CommError(RuntimeError):
    """A transfer or collective failed (a closed connection, a backend error); the message names
    the rank, the peer(s), the channel and the step."""


class CommTimeout(CommError):
    """A peer did not complete a transfer within the timeout."""


@dataclass(slots=True)
class ChannelStats:
    bytes_sent: int = 0
    bytes_recv: int = 0
    sends: int = 0
    recvs: int = 0


@dataclass(slots=True)
class _Counters:
    channels: dict[str, ChannelStats] = field(default_factory=dict)

    def get(self, name: str) -> ChannelStats:
        return self.channels.setdefault(name, ChannelStats())


_COUNTERS = _Counters()


def stats() -> dict[str, ChannelStats]:
    """Per-channel counters of this process since the last :func:`reset_stats` (copies)."""
    return _copy(_COUNTERS.channels)


def _copy(channels: dict[str, ChannelStats]) -> dict[str, ChannelStats]:
    return {k: ChannelStats(v.bytes_sent, v.bytes_recv, v.sends, v.recvs) for k, v in channels.items()}


def reset_stats() -> None:
    _COUNTERS.channels.clear()


def move_since(snapshot: dict[str, ChannelStats], channel: str) -> None:
    """Attribute everything counted since ``snapshot`` (a :func:`stats` result) to ``channel``: the
    other channels go back to their snapshot values, ``channel`` gains the difference."""
    now = _COUNTERS.channels
    moved = ChannelStats()
    for name, c in now.items():
        before = snapshot.get(name, ChannelStats())
        moved.bytes_sent += c.bytes_sent - before.bytes_sent
        moved.bytes_recv += c.bytes_recv - before.bytes_recv
        moved.sends += c.sends - before.sends
        moved.recvs += c.recvs - before.recvs
    _COUNTERS.channels = _copy(snapshot)
    count(channel, sent=moved.bytes_sent, recv=moved.bytes_recv, sends=moved.sends, recvs=moved.recvs)


def count(channel: str, *, sent: int, recv: int, sends: int = 1, recvs: int = 1) -> None:
    """Add traffic moved outside :class:`P2P` (a collective: all_gather, all_to_all, ...) to the
    counters of ``channel``: ``sent``/``recv`` bytes this rank put on / took off the wire and the
    number of messages each way (W - 1 for a collective over W ranks)."""
    c = _COUNTERS.get(channel)
    c.bytes_sent += int(sent)
    c.bytes_recv += int(recv)
    c.sends += int(sends)
    c.recvs += int(recvs)


def nbytes(specs: Sequence[Spec]) -> int:
    """Size in bytes of the packed message holding tensors of these (shape, dtype)."""
    return sum(math.prod(shape) * dt.itemsize for shape, dt in specs)


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the raw bytes of ``tensors`` (any strides) into one flat uint8 tensor: one copy
    of each tensor, straight into the message buffer."""
    buf = torch.empty(nbytes([spec_of(t) for t in tensors]), dtype=torch.uint8, device=tensors[0].device)
    off = 0
    for t in tensors:
        n = t.numel() * t.dtype.itemsize
        dst = buf[off : off + n]
        if off % t.dtype.itemsize == 0:
            dst.view(t.dtype).view(t.shape).copy_(t)
        else:  # a dtype view needs an aligned offset
            dst.copy_(t.contiguous().view(-1).view(torch.uint8))
        off += n
    return buf


def unpack(buf: torch.Tensor, specs: Sequence[Spec]) -> list[torch.Tensor]:
    """Split a packed uint8 buffer back into tensors of the given (shape, dtype) (views of ``buf``)."""
    out, off = [], 0
    for shape, dt in specs:
        n = nbytes([(shape, dt)])
        piece = buf[off : off + n]
        if off % dt.itemsize:
            piece = piece.clone()  # a dtype view needs an aligned offset
        out.append(piece.view(dt).view(shape))
        off += n
    if off != buf.numel():
        raise ValueError(f"packed message has {buf.numel()} bytes, specs describe {off}")
    return out


def spec_of(t: torch.Tensor) -> Spec:
    return tuple(t.shape), t.dtype


# ----------------------------------------------------------------------------------------------
# Which backend carries what (see Note [NCCL and gloo]).
# ----------------------------------------------------------------------------------------------


def backend_for(group: dist.ProcessGroup | None, device) -> str:
    """Name of the backend that carries tensors on ``device`` over ``group`` ("nccl", "gloo", ...;
    "" when the group has none for that device type). ``dist.get_backend`` reports one name
    ("gloo", "nccl") or, for a group initialised with per-device backends, "cpu:gloo,cuda:nccl"."""
    config = dist.get_backend(group)
    if ":" not in config:
        return config
    table = dict(item.split(":", 1) for item in config.split(","))
    return table.get(torch.device(device).type, "")


def is_nccl(group: dist.ProcessGroup | None, device=None) -> bool:
    """Whether tensors on ``device`` (default: CUDA) travel over NCCL on ``group``: then waits are
    stream-ordered, P2P tags are ignored and a step's transfers go out as one batch."""
    return backend_for(group, "cuda" if device is None else device) == "nccl"


def metadata_device(group: dist.ProcessGroup | None, device) -> torch.device:
    """Where to put a small tensor of host-side metadata for a collective over ``group``: the CPU
    when the group carries CPU tensors (gloo, or ``cpu:gloo,cuda:nccl``: no device sync at all),
    else ``device`` (a plain NCCL group; reading the result back costs one device sync)."""
    if backend_for(group, "cpu") in ("", "nccl"):
        return torch.device(device) if device is not None else torch.device("cpu")
    return torch.device("cpu")


def wait_work(work, *, nccl: bool, timeout_s: float | None) -> None:
    """Finish ``work``: on NCCL ``work.wait()`` (the current stream waits; the host does not), else
    within ``timeout_s`` seconds (None: the default; see :func:`resolve_timeout`)."""
    if nccl:
        work.wait()
    else:
        work.wait(timeout=datetime.timedelta(seconds=resolve_timeout(timeout_s)))


_CLOSED = re.compile(r"connection (was )?(closed|reset|refused)|pair closure|broken pipe|remote process exited", re.I)
_TIMEOUT = re.compile(r"time(d)? ?out", re.I)
_WAITED_MS = re.compile(r"waiting (\d+) ?ms", re.I)  # gloo: "Timed out waiting 1500ms for recv operation"


def failure_kind(e: BaseException) -> str:
    """"closed" (the connection to a peer went away), "timeout" or "error", from a backend error.
    gloo closes a pair after one of its transfers timed out ("Application timeout caused pair
    closure"): that later failure is a closed connection, not a new timeout."""
    text = str(e)
    if _CLOSED.search(text):
        return "closed"
    if _TIMEOUT.search(text):
        return "timeout"
    return "error"


def failure(e: BaseException, *, where: str, what: str, who: str, nccl: bool, timeout_s: float | None,
            elapsed_s: float, starting: bool = False, peer: str = "the peer") -> CommError:
    """The :class:`CommTimeout` or :class:`CommError` for ``what`` (a transfer or a collective) that
    failed with the backend error ``e`` after ``elapsed_s`` seconds. ``where``: "rank r (of W) on
    channel c, step s" or the like; ``who``: what to check; ``peer``: whose connection it was.

    Only a wait that ran out is a timeout: at least 90% of ``timeout_s`` elapsed, by the clock or by
    the backend's own account (gloo: "Timed out waiting 1500ms"). A backend "timeout" reported
    sooner, or when starting, belongs to an earlier operation (gloo then refuses the pair): an
    error, not a timeout. (On NCCL waits are stream-ordered: a timeout is the watchdog's.)"""
    kind = failure_kind(e)
    if kind == "timeout" and not nccl:
        limit = resolve_timeout(timeout_s)
        waited = _WAITED_MS.search(str(e))
        ran_out = elapsed_s >= 0.9 * limit or (waited is not None and int(waited.group(1)) / 1000 >= 0.9 * limit)
        if starting or not ran_out:
            kind = "early"
    if kind == "timeout":
        if nccl:
            limit_text = "the process group's timeout (NCCL watchdog)"
        else:
            limit = resolve_timeout(timeout_s)
            limit_text = f"{limit:g} s" + (f" (waited {elapsed_s:.1f} s)" if elapsed_s >= 0.9 * limit else "")
        return CommTimeout(f"{where}: {what} did not complete within {limit_text}; {who} ({e})")
    reason = {
        "closed": f"the connection to {peer} was closed (did it exit or crash?)",
        "early": (f"the backend reported a timeout after {elapsed_s:.1f} s, before this wait's {resolve_timeout(timeout_s):g} s "
                  f"could run out (an earlier transfer on this group timed out, which leaves its connections unusable)"),
        "error": "the backend reported an error",
    }[kind]
    verb = "could not be started" if starting else "failed"
    return CommError(f"{where}: {what} {verb}: {reason}; {who} ({e}; after {elapsed_s:.1f} s)")


def location(group: dist.ProcessGroup | None, channel: str, step=None) -> str:
    """"rank r (of W) on channel 'c', step s" for this process in ``group`` (step left out when None)."""
    text = f"rank {dist.get_rank(group)} (of {dist.get_world_size(group)}) on channel {channel!r}"
    return text if step is None else f"{text}, step {step}"


_CHECK_RANKS = "did every rank of the group call it, and is each still running?"


def collective(op: str, start: Callable[[], object], *, group: dist.ProcessGroup | None, device, timeout_s: float | None,
               channel: str, step=None, where_text: str | None = None, who: str = _CHECK_RANKS) -> None:
    """Run one collective of ringrt: ``start()`` issues it (``async_op=True``) and returns its work,
    which is then finished by :func:`wait_work` (on gloo within ``timeout_s``, None: the default;
    on NCCL stream-ordered, on the backend that carries ``device`` over ``group``). Any failure, at the start or in the wait, is raised as
    :class:`CommTimeout` / :class:`CommError` (see :func:`failure`) naming this rank, the group size,
    ``op``, the ``channel`` and the ``step`` (or ``where_text``), and, in a group of two, the peer.
    Counting the traffic stays with the caller (:func:`count`)."""
    nccl = is_nccl(group, device)
    limit = None if nccl else resolve_timeout(timeout_s)
    t0 = time.monotonic()
    starting = True
    try:
        work = start()
        starting = False
        if work is not None:
            wait_work(work, nccl=nccl, timeout_s=limit)
    except (RuntimeError, ConnectionError) as e:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        peer = f"peer {1 - rank}" if world == 2 else "a peer"
        raise failure(e, where=where_text or location(group, channel, step), what=op, who=who, nccl=nccl, timeout_s=limit,
                      elapsed_s=time.monotonic() - t0, starting=starting, peer=peer) from e


def rendezvous(group: dist.ProcessGroup | None, *, device, timeout_s: float | None, channel: str, step) -> None:
    """Return once every rank of ``group`` got here; else raise :class:`CommTimeout` (on gloo within
    ``timeout_s``) or :class:`CommError`. One all-reduce of one number.

    Put it before anything that would block longer than ringrt's timeout when a rank is missing,
    such as creating process groups (``dist.new_group`` waits for every rank up to the process
    group's own timeout): a rank that gave up on the previous collective (its timeout ran out
    while another rank was late) is then caught here, on every rank, within the timeout."""
    dev = metadata_device(group, device)
    flag = torch.ones(1, dtype=torch.int32, device=dev)
    collective("all_reduce", lambda: dist.all_reduce(flag, group=group, async_op=True), group=group, device=dev,
               timeout_s=timeout_s, channel=channel, step=step,
               who="every rank must get here; did one give up on an earlier collective (a timeout), exit or crash?")


# ----------------------------------------------------------------------------------------------
# Point-to-point channels.
# ----------------------------------------------------------------------------------------------

Op = tuple[str, int]  # ("send" | "recv", peer)


def _describe(ops: Sequence[Op]) -> str:
    return ", ".join(f"send to peer {p}" if kind == "send" else f"receive from peer {p}" for kind, p in ops)


class Pending:
    """Transfers in flight. ``wait()`` once: returns the received buffers in the order posted."""

    def __init__(self, channel: "P2P", step: int, works: list[tuple[object, list[Op]]], recv_bufs: list[torch.Tensor],
                 keep: list, nccl: bool = False):
        self._channel, self._step, self._works, self._nccl = channel, step, works, nccl
        self._recv_bufs, self._keep = recv_bufs, keep
        self._done = False

    def wait(self) -> list[torch.Tensor]:
        """The received buffers. On NCCL they are ready for work queued on the current stream
        afterwards (nothing blocks the host); elsewhere they are complete when this returns."""
        if self._done:
            raise RuntimeError(f"Pending.wait called twice (channel {self._channel.name!r}, step {self._step})")
        self._done = True
        for work, ops in self._works:
            t0 = time.monotonic()
            try:
                wait_work(work, nccl=self._nccl, timeout_s=self._channel.timeout)
            except (RuntimeError, ConnectionError) as e:
                raise self._channel.failure(self._step, ops, e, nccl=self._nccl, elapsed_s=time.monotonic() - t0) from e
        self._keep.clear()
        return self._recv_bufs


class P2P:
    """Point-to-point channel over ``group`` (ranks are group ranks).

    ``timeout`` (positive seconds; default ``RINGRT_P2P_TIMEOUT`` or 300) bounds each wait on gloo.
    On NCCL waits are stream-ordered and the process group's timeout and watchdog catch a hang
    instead (see Note [NCCL and gloo]).
    """

    def __init__(self, group: dist.ProcessGroup, name: str, timeout: float | None = None):
        self.group, self.name = group, name
        self.timeout = resolve_timeout(timeout)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        # Channels sharing a gloo group never match each other's messages: each has its own tag.
        # NCCL ignores tags; there every channel in flight with another has its own group.
        self.tag = zlib.crc32(name.encode()) & 0x3FFFFFFF
        self._nccl: dict[str, bool] = {}

    def is_nccl(self, device) -> bool:
        kind = torch.device(device).type
        if kind not in self._nccl:
            self._nccl[kind] = is_nccl(self.group, device)
        return self._nccl[kind]

    def post(
        self,
        *,
        step: int,
        sends: Sequence[tuple[int, torch.Tensor]] = (),
        recvs: Sequence[tuple[int, int]] = (),
        device: torch.device | None = None,
    ) -> Pending:
        """Start sends of packed uint8 messages ``(peer, buf)`` and receives ``(peer, nbytes)``
        (into buffers on ``device``, default the CPU).

        Post every send and receive of one exchange in ONE call: on NCCL they go out as one
        ``batch_isend_irecv`` group, which runs them concurrently; a receive posted on its own
        would hold up every later operation on the group until its sender gets round to it.
        """
        ops, bufs, keep = [], [], []
        counters = _COUNTERS.get(self.name)
        for peer, buf in sends:
            self._check_peer(peer, step)
            if buf.dtype != torch.uint8 or buf.dim() != 1:
                raise ValueError(f"channel {self.name!r}: send a packed 1-D uint8 buffer, got {buf.dtype} {tuple(buf.shape)}")
            ops.append((dist.isend, buf, "send", peer))
            keep.append(buf)
            counters.sends += 1
            counters.bytes_sent += buf.numel()
        for peer, n in recvs:
            self._check_peer(peer, step)
            buf = torch.empty(n, dtype=torch.uint8, device=device)
            ops.append((dist.irecv, buf, "recv", peer))
            bufs.append(buf)
            counters.recvs += 1
            counters.bytes_recv += n
        if not ops:
            return Pending(self, step, [], bufs, keep)
        nccl = self.is_nccl(ops[0][1].device)
        if nccl:
            every: list[Op] = [(kind, peer) for _, _, kind, peer in ops]
            try:
                batch = dist.batch_isend_irecv(
                    [dist.P2POp(fn, buf, group=self.group, tag=self.tag, group_peer=peer) for fn, buf, _, peer in ops])
            except (RuntimeError, ConnectionError) as e:
                raise self.failure(step, every, e, nccl=True, starting=True) from e
            # NCCL returns one coalesced work for the whole batch: it stands for every peer in it
            works = [(w, [op]) for w, op in zip(batch, every, strict=True)] if len(batch) == len(ops) else [(w, every) for w in batch]
        else:
            # gloo: receives first. A send posted before the receive from the same peer turns the
            # exchange half-duplex (see Note [NCCL and gloo]); the received buffers keep their order.
            works = []
            for fn, buf, kind, peer in sorted(ops, key=lambda op: op[2] != "recv"):
                try:
                    w = fn(buf, group=self.group, tag=self.tag, **({"group_dst": peer} if kind == "send" else {"group_src": peer}))
                except (RuntimeError, ConnectionError) as e:
                    raise self.failure(step, [(kind, peer)], e, nccl=False, starting=True) from e
                works.append((w, [(kind, peer)]))
        return Pending(self, step, works, bufs, keep, nccl=nccl)

    def failure(self, step: int, ops: Sequence[Op], e: BaseException, *, nccl: bool, starting: bool = False,
                elapsed_s: float = 0.0) -> CommError:
        """The :class:`CommTimeout` or :class:`CommError` for transfers ``ops`` that failed with ``e``
        after ``elapsed_s`` seconds of waiting (see :func:`failure`)."""
        peers = sorted({p for _, p in ops})
        if len(ops) == 1:
            what, who = _describe(ops), f"is rank {peers[0]} alive and running the same schedule?"
        else:
            what = f"the batched transfers ({_describe(ops)})"
            who = (f"they run as one NCCL group, so the peer at fault can be any of ranks {', '.join(map(str, peers))}; "
                   f"are they all alive and running the same schedule?")
        return failure(e, where=f"rank {self.rank} (of {self.world}) on channel {self.name!r}, step {step}", what=what,
                       who=who, nccl=nccl, timeout_s=self.timeout, elapsed_s=elapsed_s, starting=starting)

    def _check_peer(self, peer: int, step: int) -> None:
        if not 0 <= peer < self.world or peer == self.rank:
            raise ValueError(f"channel {self.name!r}, step {step}: rank {self.rank} cannot exchange with peer {peer} (world {self.world})")
