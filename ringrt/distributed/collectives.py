"""Collectives of the gather and all-to-all schedules, with their bytes added to ``comm``'s counters.

Each function issues one torch.distributed collective over ``group`` and records, under the given
channel name, what this rank sends and receives: a collective over W ranks moves W - 1 pieces each
way (the piece for itself stays local).

``seq_to_heads`` / ``heads_to_seq`` are the two all-to-alls of Ulysses (each is the other's backward,
``ringrt/schedules/ulysses.py``). Each moves several tensors (q, k, v; or their
gradients) in ONE all-to-all of packed messages, and puts the tokens in global order while copying
them out::

    (B, S_l, H, D) sequence shard  --seq_to_heads-->  (B, H/u, u*S_l, D) all tokens of the group, H/u heads

Each runs as :func:`ringrt.distributed.comm.collective`: on NCCL the current stream waits for the collective
(no timeout argument, nothing blocks the host; the process group's timeout and watchdog catch a
hang), on gloo the wait is bounded by ``timeout``; a failure raises ``CommTimeout`` / ``CommError``
naming the rank, the collective, the channel and the ``step`` ("forward", "backward", ...).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import comm
from .comm import count, pack, spec_of, unpack


def all_gather(tensors: list[torch.Tensor], group, channel: str, timeout: float | None = None, step=None) -> list[list[torch.Tensor]]:
    """Every member's copy of ``tensors`` (same shapes and dtypes on every member), index = group rank.

    The tensors travel packed in one buffer, so this is one collective whatever their number.
    """
    world = dist.get_world_size(group)
    buf = pack(tensors)
    parts = [torch.empty_like(buf) for _ in range(world)]
    comm.collective("all_gather", lambda: dist.all_gather(parts, buf, group=group, async_op=True), group=group,
                    device=buf.device, timeout_s=timeout, channel=channel, step=step)
    count(channel, sent=(world - 1) * buf.numel(), recv=(world - 1) * buf.numel(), sends=world - 1, recvs=world - 1)
    specs = [spec_of(t) for t in tensors]
    return [unpack(p, specs) for p in parts]


def reduce_scatter(pieces: list[torch.Tensor], group, channel: str, timeout: float | None = None, step=None) -> torch.Tensor:
    """Sum over members of ``pieces[rank]``: member j contributes ``pieces`` and receives the sum of
    everyone's ``pieces[j]``. All pieces share one shape and dtype."""
    world = dist.get_world_size(group)
    out = torch.empty_like(pieces[0])
    ins = [p.contiguous() for p in pieces]
    comm.collective("reduce_scatter", lambda: dist.reduce_scatter(out, ins, group=group, async_op=True), group=group,
                    device=out.device, timeout_s=timeout, channel=channel, step=step)
    n = pieces[0].numel() * pieces[0].element_size()
    count(channel, sent=(world - 1) * n, recv=(world - 1) * n, sends=world - 1, recvs=world - 1)
    return out


def all_to_all_packed(pieces: list[list[torch.Tensor]], group, channel: str, timeout: float | None = None,
                      step=None) -> list[list[torch.Tensor]]:
    """``pieces[j]`` (a list of tensors) goes to member j; returns, per sender, the tensors it sent to
    this member (views of the received buffer). Every member sends every other the same shapes and
    dtypes (the all-to-alls of Ulysses are symmetric), so ONE ``all_to_all_single`` of a flat buffer,
    member j's segment at [j*n, (j+1)*n), moves them all whatever their number."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    specs = [spec_of(t) for t in pieces[rank]]
    buf = pack([t for ts in pieces for t in ts])
    n = buf.numel() // world
    if not comm.is_nccl(group, buf.device):
        # gloo: as point-to-point transfers, every receive posted before the sends. gloo's own
        # all-to-all sends first, which runs the exchange with the peer W/2 away (even W) half-duplex:
        # 5 MB per rank at W = 4 over 200 mbit links, 0.34-0.37 s against 0.21 s (Note [NCCL and gloo]).
        peers = [j for j in range(world) if j != rank]
        got = comm.P2P(group, channel, timeout).post(
            step=f"{step} (all_to_all)", sends=[(j, buf[j * n : (j + 1) * n]) for j in peers], recvs=[(j, n) for j in peers],
            device=buf.device).wait()
        parts = dict(zip(peers, got, strict=True))
        parts[rank] = buf[rank * n : (rank + 1) * n]
        return [unpack(parts[i], specs) for i in range(world)]
    got = torch.empty_like(buf)
    comm.collective("all_to_all_single", lambda: dist.all_to_all_single(got, buf, group=group, async_op=True), group=group,
                    device=buf.device, timeout_s=timeout, channel=channel, step=step)
    count(channel, sent=(world - 1) * n, recv=(world - 1) * n, sends=world - 1, recvs=world - 1)
    return [unpack(got[i * n : (i + 1) * n], specs) for i in range(world)]


def _chunk_positions(member_chunks: list[list[int]]) -> list[list[int]]:
    """positions[i][c]: where member i's local chunk c goes when the group's chunks are sorted by
    global chunk id."""
    ranked = {cid: pos for pos, cid in enumerate(sorted(c for cs in member_chunks for c in cs))}
    return [[ranked[c] for c in cs] for cs in member_chunks]


def seq_to_heads(xs: list[torch.Tensor], group, member_chunks: list[list[int]], channel: str, timeout, step=None) -> list[torch.Tensor]:
    """Sequence shards (B, S_l, H_t, D) -> (B, H_t/u, u*S_l, D) contiguous, the group's tokens in
    ascending global order (``member_chunks[i]``: member i's global chunk ids in local order).
    All tensors in one all-to-all; one copy into the message, one into the result."""
    u, rank = dist.get_world_size(group), dist.get_rank(group)
    pieces = [[x[:, :, j * (x.shape[2] // u) : (j + 1) * (x.shape[2] // u)] for x in xs] for j in range(u)]
    got = all_to_all_packed(pieces, group, channel, timeout, step)
    pos = _chunk_positions(member_chunks)
    outs = []
    for t, x in enumerate(xs):
        b, s_l, h, d = x.shape
        n = len(member_chunks[rank])
        ln = s_l // n
        out = x.new_empty(b, h // u, u * s_l, d)
        seq_view = out.transpose(1, 2)  # (B, u*S_l, H/u, D)
        for i in range(u):
            for c in range(n):
                seq_view[:, pos[i][c] * ln : (pos[i][c] + 1) * ln].copy_(got[i][t][:, c * ln : (c + 1) * ln])
        outs.append(out)
    return outs


def heads_to_seq(ys: list[torch.Tensor], group, member_chunks: list[list[int]], channel: str, timeout, step=None) -> list[torch.Tensor]:
    """Inverse of :func:`seq_to_heads`: (B, H_t/u, u*S_l, D) in global order -> (B, S_l, H_t, D) contiguous."""
    u, rank = dist.get_world_size(group), dist.get_rank(group)
    pos = _chunk_positions(member_chunks)
    n = len(member_chunks[rank])
    lns = [y.shape[2] // (u * n) for y in ys]
    pieces = [
        [y.transpose(1, 2)[:, pos[j][c] * ln : (pos[j][c] + 1) * ln] for y, ln in zip(ys, lns, strict=True) for c in range(n)]
        for j in range(u)
    ]
    got = all_to_all_packed(pieces, group, channel, timeout, step)
    outs = []
    for t, (y, ln) in enumerate(zip(ys, lns, strict=True)):
        b, hu, s, d = y.shape
        out = y.new_empty(b, s // u, hu * u, d)
        for i in range(u):
            for c in range(n):
                out[:, c * ln : (c + 1) * ln, i * hu : (i + 1) * hu].copy_(got[i][t * n + c])
        outs.append(out)
    return outs
