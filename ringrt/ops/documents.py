"""Packed documents: how a sequence of several documents is cut across ranks. Pure index math.

Note [document layout]
----------------------
A packed sequence of S tokens holds documents of lengths L_0, L_1, ... (``cu_seqlens`` = the
running sums, flash-attn's convention: ``[0, L_0, L_0 + L_1, ..., S]``). Each document is cut on
its own, as the plain layouts cut a whole sequence (``layout.py``): into n = 2W chunks (zigzag) or
W chunks (contiguous) of c_i = ceil(L_i / n) tokens, the last ones padded at the document's end,
and rank r holds chunks r and 2W-1-r of every document (zigzag), so under a causal mask every rank
does the same work within every document. A rank's shard lists its pieces document by document::

    W = 2, zigzag, documents A (8 tokens) and B (5 -> padded to 8; '.' is padding)
    A: a0 a1 | a2 a3 | a4 a5 | a6 a7       B: b0 b1 | b2 b3 | b4 . | . .
    rank 0: [a0 a1 a6 a7 | b0 b1 . .]      rank 1: [a2 a3 a4 a5 | b2 b3 b4 .]

That is ring-flash-attention's varlen zigzag layout (its ``extract_local``) wherever that one is
defined, i.e. every L_i a multiple of 2W; ringrt also takes any other lengths (padding each document).
Positions restart at 0 in each document (:meth:`Documents.local_positions`), padding continuing
them; padding sits at the end of its document, so under a causal mask no real token ever sees it.
Documents of length 0 are allowed and hold no rows.

Inside a call the rows are put chunk-major (:meth:`Documents.chunk_major`): every document's piece
of the rank's first chunk, then every document's piece of its second::

    rank 0: [a0 a1 b0 b1 | a6 a7 . .]      ("virtual chunks" 0 and 3 of C = c_A + c_B = 4 rows)

Then every virtual chunk holds document i at the same offsets, and a virtual chunk g of queries
against a virtual chunk h of keys is, document by document, what chunk g against chunk h is for a
single sequence: all keys visible when h < g, a top-left causal mask when h == g, nothing when
h > g. So every schedule runs unchanged over virtual chunks of C rows, with a block kernel that
splits each block it is given into its documents (``document_kernel.py``): the work of a block is
sum_i (n_q c_i)(n_k c_i), not (n_q C)(n_k C): it scales with sum L_i^2, not S^2.

A non-causal call sees whole documents, padding included, so there every L_i must be a multiple of
n (no padding).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch

from .layout import local_chunks, num_chunks, rank_chunks

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def lengths_problem(cu_seqlens) -> str | None:
    """Why ``cu_seqlens`` does not describe documents, or None (no tensor read beyond its values)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        return f"cu_seqlens must be a 1-D integer torch.Tensor [0, L_0, L_0 + L_1, ..., S], got {type(cu_seqlens).__name__}"
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in _INT_DTYPES:
        return (f"cu_seqlens must be a 1-D integer tensor [0, L_0, L_0 + L_1, ..., S], got shape {tuple(cu_seqlens.shape)} "
                f"dtype {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 2:
        return f"cu_seqlens={cu_seqlens.tolist()} must hold at least 2 values: [0, S] for one document of S tokens"
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        return f"cu_seqlens must start at 0, got {_short(cu)}"
    bad = next((i for i in range(1, len(cu)) if cu[i] < cu[i - 1]), None)
    if bad is not None:
        return (f"cu_seqlens must not decrease (document lengths are its differences), got {_short(cu)}: "
                f"cu_seqlens[{bad}]={cu[bad]} < cu_seqlens[{bad - 1}]={cu[bad - 1]}")
    if cu[-1] == 0:
        return f"cu_seqlens={_short(cu)} holds no tokens"
    return None


def lengths_of(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """Document lengths (L_0, L_1, ...) of a valid ``cu_seqlens`` (ValueError otherwise)."""
    problem = lengths_problem(cu_seqlens)
    if problem:
        raise ValueError(problem)
    cu = cu_seqlens.tolist()
    return tuple(b - a for a, b in zip(cu, cu[1:], strict=False))


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` (int32, on the CPU) of a packed sequence whose positions restart at 0 in each
    document: position_ids (S,) or (1, S), e.g. [0 1 2 0 1 0 1 2 3] -> [0, 3, 5, 9]. Every
    document must count 0, 1, 2, ... (ValueError naming the first token that does not)."""
    pos = position_ids
    if pos.dim() == 2 and pos.shape[0] == 1:
        pos = pos[0]
    if pos.dim() != 1 or pos.numel() == 0 or pos.dtype not in _INT_DTYPES:
        raise ValueError(f"position_ids must be a non-empty 1-D (or (1, S)) integer tensor, got shape {tuple(position_ids.shape)} "
                         f"dtype {position_ids.dtype}")
    p = pos.cpu().to(torch.int64)
    starts = torch.nonzero(p == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError(f"position_ids must start at 0 (each document counts 0, 1, 2, ...), got {_short(p.tolist())}")
    cu = torch.cat([starts, torch.tensor([p.numel()])])
    expect = torch.arange(p.numel()) - torch.repeat_interleave(starts, cu.diff())
    wrong = torch.nonzero(p != expect).flatten()
    if wrong.numel():
        i = int(wrong[0])
        raise ValueError(f"position_ids[{i}]={int(p[i])}: positions must restart at 0 in each document and count up by 1 "
                         f"(expected {int(expect[i])} or 0)")
    return cu.to(torch.int32)


def document_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(S,) int64 positions of the packed sequence, restarting at 0 in each document."""
    lengths = lengths_of(cu_seqlens)
    return torch.cat([torch.arange(n) for n in lengths])


@dataclass(frozen=True, slots=True)
class Documents:
    """Documents of ``lengths`` cut for ``world`` ranks in ``layout`` (see the module note)."""

    lengths: tuple[int, ...]
    layout: str
    world: int

    @property
    def n_chunks(self) -> int:
        """Chunks each document is cut into (2W or W)."""
        return num_chunks(self.layout, self.world)

    @property
    def slots(self) -> tuple[int, ...]:
        """Rows c_i of each document in each chunk (0 for an empty document)."""
        n = self.n_chunks
        return tuple(-(-x // n) for x in self.lengths)

    @property
    def chunk(self) -> int:
        """Rows C of one virtual chunk: sum c_i."""
        return sum(self.slots)

    @property
    def local_len(self) -> int:
        """Rows of every rank's shard: C per chunk it holds."""
        return local_chunks(self.layout) * self.chunk

    @property
    def total(self) -> int:
        """Real tokens S = sum L_i."""
        return sum(self.lengths)

    @property
    def padded(self) -> int:
        """Rows over all ranks, padding included: n C."""
        return self.n_chunks * self.chunk

    def checksum(self) -> int:
        """A number that differs, almost surely, between two lists of lengths (for the ranks' agreement)."""
        return zlib.crc32(torch.tensor(self.lengths, dtype=torch.int64).numpy().tobytes())

    def padding_problem(self) -> str | None:
        """Why a non-causal call cannot take these documents, or None: it would see the padding."""
        n = self.n_chunks
        bad = next(((i, x) for i, x in enumerate(self.lengths) if x % n), None)
        if bad is None:
            return None
        return (f"causal=False with cu_seqlens needs every document length to be a multiple of {n} ({'2 x ' if n == 2 * self.world else ''}"
                f"world size {self.world} for layout={self.layout!r}): a non-causal query would see its document's padding, and "
                f"document {bad[0]} has {bad[1]} tokens. Valid: causal=True (any lengths), or lengths that are multiples of {n}")

    def local_rows(self, rank: int) -> torch.Tensor:
        """(S_l,) int64: the packed-sequence index of each row of ``rank``'s shard, -1 for padding."""
        return _local_rows(self, rank)

    def local_positions(self, rank: int) -> torch.Tensor:
        """(S_l,) int64: the in-document position of each row of ``rank``'s shard (padding continues
        its document: L_i, L_i + 1, ...)."""
        return _local_positions(self, rank)

    def chunk_major(self) -> torch.Tensor:
        """(S_l,) int64 ``perm``: row j of the chunk-major shard is row ``perm[j]`` of the shard as
        sharded (document by document). Same on every rank."""
        return _chunk_major(self)


@functools.lru_cache(maxsize=64)
def _local_rows(docs: Documents, rank: int) -> torch.Tensor:
    start, parts = 0, []
    for x, c in zip(docs.lengths, docs.slots, strict=True):
        for g in rank_chunks(docs.layout, rank, docs.world):
            pos = torch.arange(g * c, (g + 1) * c)
            parts.append(torch.where(pos < x, start + pos, -1))
        start += x
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


@functools.lru_cache(maxsize=64)
def _local_positions(docs: Documents, rank: int) -> torch.Tensor:
    parts = [torch.arange(g * c, (g + 1) * c) for c in docs.slots for g in rank_chunks(docs.layout, rank, docs.world)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


@functools.lru_cache(maxsize=64)
def _chunk_major(docs: Documents) -> torch.Tensor:
    m, big_c = local_chunks(docs.layout), docs.chunk
    perm = torch.empty(m * big_c, dtype=torch.int64)
    off = 0
    for c in docs.slots:
        for j in range(m):
            perm[j * big_c + off : j * big_c + off + c] = torch.arange(m * off + j * c, m * off + (j + 1) * c)
        off += c
    return perm


def shard_documents(x: torch.Tensor, docs: Documents, rank: int, dim: int = 1, value: float = 0) -> torch.Tensor:
    """``rank``'s shard of the packed tensor ``x`` (length S along ``dim``): its rows document by
    document, padding filled with ``value``."""
    if x.shape[dim] != docs.total:
        raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim} but cu_seqlens describes {docs.total} "
                         f"(its last value); pass the whole packed sequence")
    idx = docs.local_rows(rank).to(x.device)
    out = x.index_select(dim, idx.clamp_min(0))
    pad = (idx < 0).view(*([1] * (dim % x.dim())), -1, *([1] * (x.dim() - dim % x.dim() - 1)))
    return out.masked_fill(pad, value) if bool((idx < 0).any()) else out


def assemble_documents(shards: list[torch.Tensor], docs: Documents, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_documents`: the packed tensor (S along ``dim``) from every rank's shard
    (index = rank), padding dropped."""
    full = torch.cat(shards, dim=dim)
    idx = torch.cat([docs.local_rows(r) for r in range(len(shards))])
    keep = torch.nonzero(idx >= 0).flatten()
    order = keep[torch.argsort(idx[keep])]
    return full.index_select(dim, order.to(full.device))


def _short(xs: list) -> str:
    return str(xs) if len(xs) <= 12 else f"[{', '.join(map(str, xs[:6]))}, ..., {', '.join(map(str, xs[-3:]))}] ({len(xs)} values)"
