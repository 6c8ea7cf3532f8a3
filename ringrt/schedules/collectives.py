"""Collectives of the gather and all-to-all schedules, with their bytes added to ``comm``'s counters.

Each function issues one torch.distributed collective over ``group`` and records, under the given
channel name, what this rank sends and receives: a collective over W ranks moves W - 1 pieces each
way (the piece for itself stays local).

``SeqToHeads`` / ``HeadsToSeq`` are the two all-to-alls of Ulysses as autograd Functions (each is
the other's backward)::

    (B, S_l, H, D) sequence shard  --SeqToHeads-->  (B, u*S_l, H/u, D) all tokens of the group, H/u heads
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from ..comm import count, pack, spec_of, unpack


def _wait(work, timeout: float | None) -> None:
    work.wait(timeout=datetime.timedelta(seconds=timeout)) if timeout else work.wait()


def all_gather(tensors: list[torch.Tensor], group, channel: str, timeout: float | None = None) -> list[list[torch.Tensor]]:
    """Every member's copy of ``tensors`` (same shapes and dtypes on every member), index = group rank.

    The tensors travel packed in one buffer, so this is one collective whatever their number.
    """
    world = dist.get_world_size(group)
    buf = pack(tensors)
    parts = [torch.empty_like(buf) for _ in range(world)]
    _wait(dist.all_gather(parts, buf, group=group, async_op=True), timeout)
    count(channel, sent=(world - 1) * buf.numel(), recv=(world - 1) * buf.numel(), sends=world - 1, recvs=world - 1)
    specs = [spec_of(t) for t in tensors]
    return [unpack(p, specs) for p in parts]


def reduce_scatter(pieces: list[torch.Tensor], group, channel: str, timeout: float | None = None) -> torch.Tensor:
    """Sum over members of ``pieces[rank]``: member j contributes ``pieces`` and receives the sum of
    everyone's ``pieces[j]``. All pieces share one shape and dtype."""
    world = dist.get_world_size(group)
    out = torch.empty_like(pieces[0])
    _wait(dist.reduce_scatter(out, [p.contiguous() for p in pieces], group=group, async_op=True), timeout)
    n = pieces[0].numel() * pieces[0].element_size()
    count(channel, sent=(world - 1) * n, recv=(world - 1) * n, sends=world - 1, recvs=world - 1)
    return out


def all_to_all(pieces: list[torch.Tensor], group, channel: str, timeout: float | None = None) -> list[torch.Tensor]:
    """``pieces[j]`` goes to member j; returns what every member sent to this one (index = sender)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    pieces = [p.contiguous() for p in pieces]
    outs = [torch.empty_like(p) for p in pieces]
    _wait(dist.all_to_all(outs, pieces, group=group, async_op=True), timeout)
    sent = sum(p.numel() * p.element_size() for j, p in enumerate(pieces) if j != rank)
    recv = sum(p.numel() * p.element_size() for j, p in enumerate(outs) if j != rank)
    count(channel, sent=sent, recv=recv, sends=world - 1, recvs=world - 1)
    return outs


def _seq_to_heads(x: torch.Tensor, group, channel: str, timeout) -> torch.Tensor:
    world = dist.get_world_size(group)
    got = all_to_all(list(x.chunk(world, dim=2)), group, channel, timeout)  # each (B, S_l, H/u, D)
    return torch.cat(got, dim=1)


def _heads_to_seq(y: torch.Tensor, group, channel: str, timeout) -> torch.Tensor:
    world = dist.get_world_size(group)
    got = all_to_all(list(y.chunk(world, dim=1)), group, channel, timeout)  # each (B, S_l, H/u, D)
    return torch.cat(got, dim=2)


class SeqToHeads(torch.autograd.Function):
    """(B, S_l, H, D) -> (B, u*S_l, H/u, D): member i's tokens at rows [i*S_l, (i+1)*S_l)."""

    @staticmethod
    def forward(ctx, x, group, channel: str, timeout):
        ctx.args = (group, channel, timeout)
        return _seq_to_heads(x, *ctx.args)

    @staticmethod
    def backward(ctx, dy):
        return _heads_to_seq(dy, *ctx.args), None, None, None


class HeadsToSeq(torch.autograd.Function):
    """Inverse of :class:`SeqToHeads`: (B, u*S_l, H/u, D) -> (B, S_l, H, D)."""

    @staticmethod
    def forward(ctx, y, group, channel: str, timeout):
        ctx.args = (group, channel, timeout)
        return _heads_to_seq(y, *ctx.args)

    @staticmethod
    def backward(ctx, dx):
        return _seq_to_heads(dx, *ctx.args), None, None, None


def reorder_chunks(x: torch.Tensor, order: list[int], dim: int = 1) -> torch.Tensor:
    """Cut ``x`` into len(order) equal chunks along ``dim`` and put chunk ``order[i]`` at position i."""
    parts = x.chunk(len(order), dim=dim)
    return torch.cat([parts[i] for i in order], dim=dim)
