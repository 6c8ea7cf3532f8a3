"""Which (query chunk x key chunk) rectangles a rank computes. Pure integers.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

Rows = tuple[int, int]


@dataclass(frozen=True, slots=True)
class ChunkBlock:
    """``q_rows`` x ``k_rows`` (chunk units of the local tensors); ``diagonal``: top-left causal."""

    q_rows: Rows
    k_rows: Rows
    diagonal: bool


def chunk_blocks(q_chunks: Sequence[int], k_chunks: Sequence[int], causal: bool) -> list[ChunkBlock]:
    """Rectangles covering exactly the visible (query chunk, key chunk) pairs.

    q_chunks: global chunk ids of the local queries, in local order.
    k_chunks: global chunk ids of the keys, strictly ascending.
    """
    if any(a >= b for a, b in zip(k_chunks, k_chunks[1:])):
        raise ValueError(f"key chunks must be strictly ascending, got {list(k_chunks)}")
    nq, nk = len(q_chunks), len(k_chunks)
    if not causal:
        return [ChunkBlock((0, nq), (0, nk), False)]
    if list(q_chunks) == list(k_chunks):  # same tokens in the same (global) order: one top-left causal call
        return [ChunkBlock((0, nq), (0, nk), True)]
    blocks: list[ChunkBlock] = []
    for i, c in enumerate(q_chunks):
        n_full = sum(1 for kc in k_chunks if kc < c)
        if n_full:
            last = blocks[-1] if blocks else None
            if last is not None and not last.diagonal and last.q_rows[1] == i and last.k_rows == (0, n_full):
                blocks[-1] = ChunkBlock((last.q_rows[0], i + 1), (0, n_full), False)
            else:
                blocks.append(ChunkBlock((i, i + 1), (0, n_full), False))
        if n_full < nk and k_chunks[n_full] == c:
            blocks.append(ChunkBlock((i, i + 1), (n_full, n_full + 1), True))
    return blocks


def block_cost(blocks: Sequence[ChunkBlock]) -> float:
    """Score entries computed, in chunk x chunk units (a diagonal block counts half)."""
    return sum((b.q_rows[1] - b.q_rows[0]) * (b.k_rows[1] - b.k_rows[0]) * (0.5 if b.diagonal else 1.0) for b in blocks)


def rows(x, r: Rows, chunk: int):
    """Sequence rows ``r`` (chunk units) of x (B, H, S, ...)."""
    return x[:, :, r[0] * chunk : r[1] * chunk]
