"""Extensible Tokenization over a sequence-parallel group: the only compression module that
communicates (the embedder, the selection and the packing are pure torch).

Note [sequence-parallel compression]

    full context, C chunks       | c0 c1 c2 | c3 c4 c5 | c6 c7 |      raw tail (every rank)
    rank (chunk-aligned shards)     rank 0     rank 1    rank 2
      1. encode own chunks, keep every k-th output       (no communication)
      2. all_gather the compressed parts (sizes known to every rank in advance)
                                 [  comp 0..M-1 (≈ C·c / k)  ;  raw tail R  ]
      3. zigzag re-shard of that shrunk sequence (ringrt.shard), padded at its end to 2W
      4. the frozen LLM runs on the shard with ring attention (any ringrt.ALGORITHMS)

Step 2 moves M·dim values to each rank — a k-fold shrunk sequence, one all_gather — and is not
differentiable (inference/evaluation; the embedder trains data-parallel, ``compression/train.py``).
Padding at the end is never seen by a real token under causal attention, so outputs are exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed.groups import base_group
from ..ops.layout import num_chunks, pad_to_multiple, positions as layout_positions, shard_of
from ..model.llama import Llama
from ..model.parallel import RingAttend
from .embedder import encode_chunks
from .select import check_k, chunk_lengths, downscale


def chunk_ranges(n_chunks: int, world: int) -> list[tuple[int, int]]:
    """Chunk-aligned contiguous shards: [lo, hi) chunk indices of every rank, sizes differ by <= 1."""
    base, extra = divmod(n_chunks, world)
    out, lo = [], 0
    for r in range(world):
        hi = lo + base + (r < extra)
        out.append((lo, hi))
        lo = hi
    return out


@torch.no_grad()
def compress_context(embedder, context: torch.Tensor, *, chunk_len: int, k: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The compressed context (B, M, dim), on every rank; each rank encodes only its own chunks.

    context: (B, N) token ids, the same full tensor on every rank.
    """
    check_k(k)
    g, rank, world = base_group(group)
    lengths = chunk_lengths(context.shape[1], chunk_len)
    ranges = chunk_ranges(len(lengths), world)
    counts = [sum(-(-c // k) for c in lengths[lo:hi]) for lo, hi in ranges]  # compressed entries per rank
    lo, hi = ranges[rank]
    if len(lengths) < world:  # the same on every rank: all raise, before any communication
        raise ValueError(f"a context of {len(lengths)} chunks (compression.chunk_len={chunk_len}) cannot give every one "
                         f"of {world} ranks a chunk; valid: at least {world} chunks (a longer context or shorter chunks)")
    ids = context[:, lo * chunk_len : lo * chunk_len + sum(lengths[lo:hi])]
    mine = downscale(encode_chunks(embedder, ids, chunk_len), k, lengths[lo:hi])  # (B, counts[rank], dim)
    if world == 1:
        return mine
    width = max(counts)
    padded = torch.zeros(mine.shape[0], width, mine.shape[-1], dtype=mine.dtype, device=mine.device)
    padded[:, : mine.shape[1]] = mine
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=g)
    return torch.cat([p[:, :n] for p, n in zip(parts, counts, strict=True)], dim=1)  # (B, M, dim)


@torch.no_grad()
def compressed_logits(
    llm: Llama,
    embedder,
    context: torch.Tensor,
    raw: torch.Tensor,
    *,
    chunk_len: int,
    k: int,
    keep: int | None = None,
    algorithm: str = "tokenring",
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The frozen LLM over [compressed context; raw tokens], sharded zigzag over ``group``.

    context (B, N) and raw (B, R) token ids, the same on every rank, on the models' device. ``keep``: only the last
    ``keep`` compressed embeddings are read (None = all). The LLM reads the sequence at positions
    0 .. M + R - 1 (compressed first, then raw). Returns (this rank's logits (B, S_local, V), their
    positions (S_local,) in that sequence, M); positions >= M + R are end padding.
    """
    comp = compress_context(embedder, context, chunk_len=chunk_len, k=k, group=group)  # (B, M, dim)
    if keep is not None:
        comp = comp[:, max(0, comp.shape[1] - keep) :]
    seq = torch.cat([comp, llm.embed_tokens(raw)], dim=1)  # (B, M + R, dim)
    _, rank, world = base_group(group)
    if world == 1:
        return llm(inputs_embeds=seq), torch.arange(seq.shape[1], device=seq.device), comp.shape[1]
    n = num_chunks("zigzag", world)
    seq = pad_to_multiple(seq, n, dim=1)  # (B, S_pad, dim), zeros at the end
    local = shard_of(seq, "zigzag", rank, world, dim=1)  # (B, S_pad / W, dim)
    pos = layout_positions("zigzag", rank, world, local.shape[1]).to(seq.device)
    logits = llm(inputs_embeds=local, positions=pos, attend=RingAttend(algorithm=algorithm, layout="zigzag", group=group))
    return logits, pos, comp.shape[1]

