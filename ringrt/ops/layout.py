"""How a sequence is cut across the ranks of a group. Pure index math, no communication.

Two layouts:

* ``"contiguous"``: the sequence is cut into W equal chunks; rank r holds chunk r. Used for
  non-causal attention (every rank does the same work) and for sliding-window / Λ-masks (each query
  needs only nearby keys, so locality matters more than balance).
* ``"zigzag"``: the sequence is cut into 2W equal chunks; rank r holds chunks r and 2W-1-r, in that
  order. Under a causal mask every rank then does the same amount of work::

      W = 2, chunks 0..3        rank 0: [c0 | c3]      rank 1: [c1 | c2]

Token order inside a rank's shard always follows global order, which is what lets the local
(diagonal) block use a plain top-left causal mask.
"""

from __future__ import annotations

from typing import Sequence

import torch

LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a known layout; valid: {', '.join(LAYOUTS)}")


def num_chunks(layout: str, world: int) -> int:
    """Number of equal chunks the full sequence is cut into (W or 2W)."""
    check_layout(layout)
    return 2 * world if layout == "zigzag" else world


def rank_chunks(layout: str, rank: int, world: int) -> list[int]:
    """Global chunk indices held by ``rank``, in the order they sit in its shard."""
    check_layout(layout)
    if layout == "zigzag":
        return [rank, 2 * world - 1 - rank]
    return [rank]


def local_chunks(layout: str) -> int:
    """Chunks per rank: 2 for zigzag, 1 for contiguous."""
    check_layout(layout)
    return 2 if layout == "zigzag" else 1


def positions(layout: str, rank: int, world: int, local_len: int) -> torch.Tensor:
    """Global token positions of the ``local_len`` tokens held by ``rank`` (int64, shape (local_len,))."""
    n = local_chunks(layout)
    if local_len % n:
        raise ValueError(f"local_len={local_len} must be a multiple of {n} for layout={layout!r}")
    c = local_len // n
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in rank_chunks(layout, rank, world)])


def shard_of(x: torch.Tensor, layout: str, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """The part of the full tensor ``x`` that ``rank`` holds (a copy; concatenation of its chunks)."""
    n = num_chunks(layout, world)
    size = x.shape[dim]
    if size % n:
        raise ValueError(
            f"sequence length {size} (dim {dim}) is not divisible by {n}, which layout={layout!r} "
            f"needs at world size {world}; pad it with ringrt.pad_to_multiple(x, {n}, dim={dim})"
        )
    chunks = x.chunk(n, dim=dim)
    return torch.cat([chunks[i] for i in rank_chunks(layout, rank, world)], dim=dim)


def assemble(shards: Sequence[torch.Tensor], layout: str, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_of`: the full tensor from every rank's shard (index = rank)."""
    world = len(shards)
    per = local_chunks(layout)
    pieces: list[torch.Tensor | None] = [None] * num_chunks(layout, world)
    for r, s in enumerate(shards):
        for idx, piece in zip(rank_chunks(layout, r, world), s.chunk(per, dim=dim), strict=True):
            pieces[idx] = piece
    return torch.cat(pieces, dim=dim)  # type: ignore[arg-type]


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int = 1, value: float = 0.0) -> torch.Tensor:
    """Right-pad ``x`` along ``dim`` to a multiple of ``multiple``.

    Under causal attention, padding at the end never changes the outputs of the real tokens (no
    real query sees a later key), so ``attention(pad(q), pad(k), pad(v))[:, :S]`` is exact. For
    non-causal attention padded keys would be attended to: mask them or do not pad.
    """
    size = x.shape[dim]
    extra = (-size) % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)
