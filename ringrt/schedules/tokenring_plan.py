"""The TokenRing schedule: which block every rank computes at every step, and what it sends where.

Pure integers; no tensors, no process groups. Tested as a (rank x step) table.

Note [TokenRing]
----------------
Each rank keeps its own K/V. At step s rank r holds the queries of owner o = (r + s) mod W: the
queries visit the ranks r, r-1, r-2, ... in turn. It computes the partial attention of those queries
against its own K/V and sends the partial (out, lse) straight back to the owner, who merges it.

The queries do not hop round the ring: at step s every owner sends its own queries (just the rows the
receiver needs) straight to the rank that visits them at step s + 1, r - s - 1. So the link a -> b
carries a's queries to b and the partial of b's queries over a's keys, both ways of every link carry
traffic, and, causal zigzag, every link direction carries 3 chunks of rows per pass (whole q + half
partial when b < a, half q + whole partial when b > a). Relaying (r -> r-1 each step) moves the same
total but piles it on the ring links: at W = 3 the busiest link carried 4 q chunks + 1 partial chunk
(16.7 MB vs 9.5 MB per fwd+bwd call of 12 heads x 64 x 768 tokens per rank, fp32).

Causal, zigzag layout, W = 2 (chunks c0..c3; rank 0 holds [c0|c3], rank 1 holds [c1|c2])::

                 keys ->  c0  c1  c2  c3          step 0: diagonal blocks, local top-left causal
     queries  c0          d   .   .   .           step 1: rank 0 gets rank 1's q [c1|c2]:
              c1          1   d   .   .                   owner 1 > rank 0 -> whole q vs k[c0]  ("1")
              c2          1   1   d   .                   rank 1 gets rank 0's q, owner 0 < rank 1
              c3          1   1   1   d                   -> only q[c3] vs whole k [c1|c2]       ("1")

Every step then costs 2*C^2 score entries per rank: the work is balanced. A rank that needs only
the back half of a query gets only its back half.

Rows are given in chunk units of the local shard: (0, 2) is the whole zigzag shard, (1, 2) its
second chunk, (0, 1) its first.

In ``topology="ring"`` (no direct links between distant ranks) partial results cannot go straight
back. Instead the query heads are split in two halves that travel in opposite directions, each
carrying its running (out, lse) accumulator; after W-1 hops the bundle is one hop from its owner and
goes home. Every transfer is then between neighbours and both link directions stay busy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..ops.layout import local_chunks, rank_chunks
from .blocks import Block, Rows


@dataclass(frozen=True, slots=True)
class Transfer:
    """``rows`` of a tensor going to (or coming from) ``peer``."""

    peer: int
    rows: Rows


@dataclass(frozen=True, slots=True)
class Step:
    """What rank ``rank`` does at step ``step`` of a TokenRing pass (direct topology)."""

    step: int
    owner: int
    held: Rows | None  # rows of the owner's queries held at this step (None: nothing to do)
    block: Block | None  # None: the mask leaves this (owner, rank) pair empty
    q_send: Transfer | None
    q_recv: Transfer | None
    out_send: Transfer | None
    out_recv: Transfer | None


def block_for(owner: int, rank: int, world: int, causal: bool, layout: str) -> Block | None:
    """The non-empty rectangle of (owner's queries) x (rank's keys), or None if it is empty.

    The block is ``diagonal`` when owner == rank under a causal mask: the local causal block, for
    which a top-left causal mask is exact because local order follows global order.
    """
    n = local_chunks(layout)
    qc, kc = rank_chunks(layout, owner, world), rank_chunks(layout, rank, world)
    if owner == rank:
        return Block((0, n), (0, n), diagonal=causal)
    live = [(i, j) for i in range(n) for j in range(n) if not causal or qc[i] > kc[j]]
    if not live:
        return None
    qi = [i for i, _ in live]
    kj = [j for _, j in live]
    q_rows, k_rows = (min(qi), max(qi) + 1), (min(kj), max(kj) + 1)
    full = {(i, j) for i in range(*q_rows) for j in range(*k_rows)}
    if full != set(live):  # cannot happen for contiguous / zigzag; guards a future layout
        raise ValueError(f"layout {layout!r} gives a non-rectangular block for owner {owner}, rank {rank}")
    return Block(q_rows, k_rows, diagonal=False)


def rows_needed_by(owner: int, rank: int, world: int, causal: bool, layout: str) -> Rows | None:
    """Rows of ``owner``'s queries that ``rank`` needs (None: none)."""
    b = block_for(owner, rank, world, causal, layout)
    return None if b is None else b.q_rows


@functools.lru_cache(maxsize=256)
def tokenring_schedule(rank: int, world: int, causal: bool, layout: str) -> tuple[Step, ...]:
    """The W steps of rank ``rank`` (direct topology: every rank sends its own queries straight to the
    ranks that need them, and partials go straight back to their owner)."""
    steps = []
    held: Rows | None = (0, local_chunks(layout))
    for s in range(world):
        owner = (rank + s) % world
        block = block_for(owner, rank, world, causal, layout) if held is not None else None
        q_send = q_recv = None
        if s < world - 1:
            # this rank's own queries go to the rank that visits them at step s + 1 ...
            dst = (rank - s - 1) % world
            send_rows = rows_needed_by(rank, dst, world, causal, layout)
            if send_rows is not None:
                q_send = Transfer(dst, send_rows)
            # ... while the queries this rank visits next come from their owner
            nxt = (rank + s + 1) % world
            recv_rows = rows_needed_by(nxt, rank, world, causal, layout)
            if recv_rows is not None:
                q_recv = Transfer(nxt, recv_rows)
        out_send = out_recv = None
        if s > 0:
            if block is not None:
                out_send = Transfer(owner, block.q_rows)
            src = (rank - s) % world
            back = block_for(rank, src, world, causal, layout)
            if back is not None:
                out_recv = Transfer(src, back.q_rows)
        steps.append(Step(s, owner, held, block, q_send, q_recv, out_send, out_recv))
        held = q_recv.rows if q_recv is not None else None
    return tuple(steps)


@dataclass(frozen=True, slots=True)
class RelayStep:
    """One step of one direction of the neighbour-relay pass (``topology="ring"``).

    The bundle (whole query of ``owner`` + its running accumulator) is computed on, then sent to
    ``send_to``; the next bundle arrives from ``recv_from``. At the last step the bundle sent is
    the finished result going home and the one received is this rank's own.
    """

    step: int
    owner: int
    block: Block | None
    send_to: int
    recv_from: int


@functools.lru_cache(maxsize=256)
def relay_schedule(rank: int, world: int, causal: bool, layout: str, direction: int) -> tuple[RelayStep, ...]:
    """Steps of one direction (-1: bundles move r -> r-1; +1: r -> r+1)."""
    if direction not in (-1, 1):
        raise ValueError(f"direction={direction} must be -1 or +1")
    out = []
    for s in range(world):
        owner = (rank - direction * s) % world
        out.append(
            RelayStep(
                s,
                owner,
                block_for(owner, rank, world, causal, layout),
                (rank + direction) % world,
                (rank - direction) % world,
            )
        )
    return tuple(out)


SPLIT_MIN_SCORES = 1 << 18
"""The own block splits in two head halves only from B*H*S_l^2 of this many scores (about 1 ms of
CPU kernel at D = 64): below it one more kernel call (~50 us) costs more than the overlap it buys."""
PIECE_BYTES = 1 << 19
"""Query transfers are cut into head pieces of about this many bytes (at most one per query head),
so the first block starts when its first piece has arrived, not the whole bundle."""
INFLIGHT_BYTES = 1 << 28
"""Receive buffers (query pieces and partial results) in flight at once per rank, at most (but
always at least the next unit): posting every step's transfers at once keeps every link busy, this
bounds the memory it takes on long sequences (then later units are posted as earlier ones finish)."""


def n_pieces(bundle_bytes: int) -> int:
    """How many head pieces a query bundle of ``bundle_bytes`` is cut into (before ``head_pieces`` caps it)."""
    return max(1, -(-bundle_bytes // PIECE_BYTES))


def head_pieces(heads: int, kv_heads: int, n: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """About ``n`` contiguous pieces [(query heads, kv heads)] of ``heads`` query heads over ``kv_heads``
    kv heads: whole kv groups while there are at least n of them, else each group's query heads cut
    further (at most one piece per query head). Each piece is a valid attention problem on its own."""
    g = heads // kv_heads
    n = max(1, min(n, heads))
    if n <= kv_heads:
        kb = [round(i * kv_heads / n) for i in range(n + 1)]
        return [((a * g, b * g), (a, b)) for a, b in zip(kb, kb[1:], strict=False)]
    per = min(g, -(-n // kv_heads))
    out = []
    for kh in range(kv_heads):
        qb = [kh * g + round(i * g / per) for i in range(per + 1)]
        out += [((a, b), (kh, kh + 1)) for a, b in zip(qb, qb[1:], strict=False)]
    return out
