"""Down-scaling by a factor k, and choosing k. Pure index math on embedder outputs.

A context is cut into chunks of ``chunk_len`` tokens (the last one may be shorter); each chunk is
encoded independently. Down-scaling keeps the LAST output of every group of k tokens of a chunk,
``O[:, k-1::k]``; a final partial group (chunk length not a multiple of k) is closed by the chunk's
last token, so a chunk of c tokens gives ceil(c / k) embeddings. Chunk of 8 tokens::

    token        0 1 2 3 4 5 6 7
    k = 2        . x . x . x . x      -> indices 1, 3, 5, 7
    k = 4        . . . x . . . x      -> indices 3, 7
    k = 3        . . x . . x . x      -> indices 2, 5, 7  (7 closes the partial group 6..7)

Nesting: the k·t selection is a subset of the k selection (j·k·t - 1 is a multiple of k minus one,
and the closing index c - 1 is in both), so outputs cached at a base factor serve every multiple of it.
"""

from __future__ import annotations

import torch


def check_k(k: int, setting: str = "compression.k") -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{setting}={k!r} must be a positive integer (e.g. 2, 4, 8, 16, 32)")


def select_indices(chunk_len: int, k: int) -> torch.Tensor:
    """Indices (int64, (ceil(chunk_len / k),)) kept from one chunk of ``chunk_len`` outputs."""
    check_k(k)
    idx = list(range(k - 1, chunk_len, k))
    if chunk_len % k:
        idx.append(chunk_len - 1)
    return torch.tensor(idx, dtype=torch.int64)


def chunk_lengths(n_tokens: int, chunk_len: int) -> list[int]:
    """Lengths of the chunks a context of ``n_tokens`` is cut into (all ``chunk_len`` but the last)."""
    full, rest = divmod(n_tokens, chunk_len)
    return [chunk_len] * full + ([rest] if rest else [])


def compressed_len(n_tokens: int, chunk_len: int, k: int) -> int:
    """Embeddings a context of ``n_tokens`` compresses to: the sum of ceil(c / k) over its chunks."""
    check_k(k)
    return sum(-(-c // k) for c in chunk_lengths(n_tokens, chunk_len))


def downscale(outputs: torch.Tensor, k: int, lengths: list[int] | None = None) -> torch.Tensor:
    """Keep the last output of every group of k tokens, chunk by chunk.

    outputs: (B, N, dim), the embedder outputs of N tokens whose chunks have ``lengths`` (default:
    one chunk of N). Returns (B, sum ceil(c / k), dim), chunks in order.
    """
    lengths = [outputs.shape[1]] if lengths is None else lengths
    if sum(lengths) != outputs.shape[1]:
        raise ValueError(f"chunk lengths {lengths} sum to {sum(lengths)}, not the {outputs.shape[1]} outputs given")
    idx, start = [], 0
    for c in lengths:
        idx.append(select_indices(c, k) + start)
        start += c
    return outputs.index_select(1, torch.cat(idx).to(outputs.device))


def choose_k(n_ctx: int, n_raw: int, *, window: int, chunk_len: int, ks: list[int]) -> int:
    """The smallest k in ``ks`` such that the compressed context plus the raw tail fit the window:
    compressed_len(n_ctx, chunk_len, k) + n_raw <= window. ValueError when none does."""
    for k in sorted(ks):
        if compressed_len(n_ctx, chunk_len, k) + n_raw <= window:
            return k
    need = compressed_len(n_ctx, chunk_len, max(ks)) + n_raw
    raise ValueError(
        f"compression.ks={sorted(ks)}: even k={max(ks)} gives {need} embeddings for {n_ctx} context + {n_raw} raw "
        f"tokens, more than compression.window={window}; valid: a larger k in compression.ks, a larger window, "
        f"or fewer raw tokens"
    )
