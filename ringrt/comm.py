"""All point-to-point traffic of ringrt goes through this module.

A :class:`P2P` channel wraps one process group. ``post`` starts non-blocking sends and receives of
flat byte messages and returns a :class:`Pending`; ``Pending.wait`` finishes them within the
channel's timeout, or raises :class:`CommTimeout` naming this rank, the peer, the channel and the
step, so a peer that never sends is an error instead of a hang.

Every message is one uint8 tensor: several tensors of mixed dtypes (an fp16 block output and its
fp32 log-sum-exp, say) are packed into one buffer so each transfer costs one operation.

Each channel counts what it moves (bytes and operations, sent and received) into per-process
counters that tests and benchmarks read with :func:`stats` and clear with :func:`reset_stats`;
collectives issued elsewhere add their traffic with :func:`count`.
"""

from __future__ import annotations

import datetime
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = float(os.environ.get("RINGRT_P2P_TIMEOUT", "300"))

Spec = tuple[tuple[int, ...], torch.dtype]


class CommTimeout(RuntimeError):
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


class Pending:
    """Transfers in flight. ``wait()`` once: returns the received buffers in the order posted."""

    def __init__(self, channel: "P2P", step: int, works: list, recv_bufs: list[torch.Tensor], keep: list):
        self._channel, self._step, self._works = channel, step, works
        self._recv_bufs, self._keep = recv_bufs, keep
        self._done = False

    def wait(self) -> list[torch.Tensor]:
        if self._done:
            raise RuntimeError(f"Pending.wait called twice (channel {self._channel.name!r}, step {self._step})")
        self._done = True
        timeout = datetime.timedelta(seconds=self._channel.timeout)
        for work, kind, peer in self._works:
            try:
                work.wait(timeout=timeout)
            except RuntimeError as e:
                c = self._channel
                what = f"receive from peer {peer}" if kind == "recv" else f"send to peer {peer}"
                raise CommTimeout(
                    f"rank {c.rank} (of {c.world}) on channel {c.name!r}, step {self._step}: {what} did not "
                    f"complete within {c.timeout:g} s; is rank {peer} alive and running the same schedule? "
                    f"({e})"
                ) from e
        self._keep.clear()
        return self._recv_bufs


class P2P:
    """Point-to-point channel over ``group`` (ranks are group ranks)."""

    def __init__(self, group: dist.ProcessGroup, name: str, timeout: float | None = None):
        self.group, self.name = group, name
        self.timeout = DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self._batched = dist.get_backend(group) == "nccl"
        # Channels that share a process group never match each other's messages: each has its own tag.
        self.tag = zlib.crc32(name.encode()) & 0x3FFFFFFF

    def post(
        self,
        *,
        step: int,
        sends: Sequence[tuple[int, torch.Tensor]] = (),
        recvs: Sequence[tuple[int, int]] = (),
        device: torch.device | None = None,
    ) -> Pending:
        """Start sends of packed uint8 messages ``(peer, buf)`` and receives ``(peer, nbytes)``.

        On gloo each transfer is a plain isend/irecv (batch_isend_irecv costs ~0.4-0.6 ms more per
        exchange there); on NCCL they go out as one ``batch_isend_irecv`` group, which NCCL needs to
        run a step's sends and receives concurrently without deadlock.
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
        if self._batched and ops:
            p2p = [dist.P2POp(fn, buf, group=self.group, tag=self.tag, group_peer=peer) for fn, buf, _, peer in ops]
            works = [(w, kind, peer) for w, (_, _, kind, peer) in zip(dist.batch_isend_irecv(p2p), ops)]
        else:
            works = [
                (fn(buf, group=self.group, tag=self.tag, **({"group_dst": peer} if kind == "send" else {"group_src": peer})), kind, peer)
                for fn, buf, kind, peer in ops
            ]
        return Pending(self, step, works, bufs, keep)

    def _check_peer(self, peer: int, step: int) -> None:
        if not 0 <= peer < self.world or peer == self.rank:
            raise ValueError(f"channel {self.name!r}, step {step}: rank {self.rank} cannot exchange with peer {peer} (world {self.world})")
