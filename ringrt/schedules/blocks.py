"""Which (query rows x key rows) rectangles a rank computes, and how to slice them. Pure integers.

Every schedule here sees the sequence as equal chunks with global ids (``layout.rank_chunks``). A
rank holds its queries as a list of chunk ids in local order and, at some step, keys as another
list in ascending order (a K/V shard visiting in a ring, the whole gathered sequence, or the sorted
union of a Ulysses group's shards). Under a causal mask a query chunk ``c`` sees every key chunk
``< c`` completely, key chunk ``c`` through a top-left causal mask (same tokens, same order), and
nothing after ``c``. Since the key chunks are ascending, the fully visible ones are a prefix::

    keys (ascending ids)     k0  k1  k2  k3
    query chunk c, k1 == c   F   d   .   .       F: no mask   d: top-left causal   .: skipped

so each query chunk costs at most two kernel calls, with no explicit mask. Adjacent query chunks
that see the same prefix and no diagonal share one call (zigzag's back chunk plus front chunk
against a shard that precedes both, for instance).

A :class:`Block` is the one rectangle type of every schedule (TokenRing's plan included) and of the
cost model; :func:`rows` is the one way to cut its rows out of a (B, H, S, ...) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

Rows = tuple[int, int]
"""A half-open range [start, end) of sequence rows, in chunk units (tokens when the chunk is 1)."""


@dataclass(frozen=True, slots=True)
class Block:
    """``q_rows`` x ``k_rows`` of the local query and key tensors; ``diagonal``: run under a top-left
    causal mask, exact because the block's queries and keys are the same tokens in the same order."""

    q_rows: Rows
    k_rows: Rows
    diagonal: bool


def chunk_blocks(q_chunks: Sequence[int], k_chunks: Sequence[int], causal: bool) -> list[Block]:
    """Rectangles covering exactly the visible (query chunk, key chunk) pairs.

    q_chunks: global chunk ids of the local queries, in local order.
    k_chunks: global chunk ids of the keys, strictly ascending.
    """
    if any(a >= b for a, b in zip(k_chunks, k_chunks[1:], strict=False)):  # neighbours: one shorter by design
        raise ValueError(f"key chunks must be strictly ascending, got {list(k_chunks)}")
    nq, nk = len(q_chunks), len(k_chunks)
    if not causal:
        return [Block((0, nq), (0, nk), False)]
    if list(q_chunks) == list(k_chunks):  # same tokens in the same (global) order: one top-left causal call
        return [Block((0, nq), (0, nk), True)]
    blocks: list[Block] = []
    for i, c in enumerate(q_chunks):
        n_full = sum(1 for kc in k_chunks if kc < c)
        if n_full:
            last = blocks[-1] if blocks else None
            if last is not None and not last.diagonal and last.q_rows[1] == i and last.k_rows == (0, n_full):
                blocks[-1] = Block((last.q_rows[0], i + 1), (0, n_full), False)
            else:
                blocks.append(Block((i, i + 1), (0, n_full), False))
        if n_full < nk and k_chunks[n_full] == c:
            blocks.append(Block((i, i + 1), (n_full, n_full + 1), True))
    return blocks


def rows(x, r: Rows, chunk: int = 1, base: int = 0):
    """Sequence rows ``r`` of x (B, H, S, ...): chunks of ``chunk`` tokens, counted from chunk ``base``
    (x holds rows base, base + 1, ... of a longer sequence). A view."""
    return x[:, :, (r[0] - base) * chunk : (r[1] - base) * chunk]


def n_rows(r: Rows) -> int:
    """How many rows (chunks) ``r`` spans."""
    return r[1] - r[0]
