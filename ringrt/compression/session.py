"""Online mode: a session that condenses raw tokens into compressed embeddings as the window fills.

The session holds [compressed embeddings; raw tokens]. ``append`` adds raw tokens; whenever the
total exceeds ``window``, the oldest ``chunk_len`` raw tokens are encoded as one chunk and replaced by
their ceil(chunk_len / k) compressed embeddings; when compressed embeddings alone leave no room for
the raw tail, the oldest are dropped. Chunk boundaries are those of the token stream (every
``chunk_len`` tokens from the start), so after appending a stream the session holds exactly the
offline compression of its condensed prefix (tested). ``logits()`` runs the frozen LLM over the
whole window (positions 0 .. len - 1); there is no KV cache across calls.

    window 8, chunk 4, k 2:   append 6 raw   [r r r r r r]
                              append 4 raw   [c c | r r r r r r]      (oldest 4 raw -> 2 compressed)
"""

from __future__ import annotations

import torch

from ..model.llama import Llama
from .select import check_k, select_indices


class CompressionSession:
    """[compressed; raw] context of one stream (batch 1) for a frozen ``llm`` and an ``embedder``."""

    def __init__(self, llm: Llama, embedder, *, k: int, chunk_len: int, window: int):
        check_k(k)
        m = -(-chunk_len // k)
        if window < chunk_len + m:
            raise ValueError(f"window={window} must hold at least one chunk of raw tokens plus its compressed form "
                             f"(chunk_len {chunk_len} + {m}); valid: window >= {chunk_len + m}")
        self.llm, self.embedder, self.k, self.chunk_len, self.window = llm, embedder, k, chunk_len, window
        dim, weight = llm.config.dim, llm.embed_tokens.weight
        self.comp = torch.zeros(1, 0, dim, dtype=weight.dtype, device=weight.device)  # (1, M, dim), the LLM's device
        self.raw = torch.zeros(1, 0, dtype=torch.int64, device=weight.device)  # (1, R)
        self.select = select_indices(chunk_len, k).to(weight.device)  # kept outputs of a condensed chunk
        self.condensed = 0
        """Tokens condensed so far (a multiple of chunk_len)."""
        self.dropped = 0
        """Compressed embeddings dropped from the front."""

    def __len__(self) -> int:
        return self.comp.shape[1] + self.raw.shape[1]

    @torch.no_grad()
    def append(self, ids: torch.Tensor) -> None:
        """Add raw tokens ids (T,) or (1, T), any device; condense / drop until the window holds the context."""
        self.raw = torch.cat([self.raw, ids.reshape(1, -1).to(self.raw.device, torch.int64)], dim=1)
        while len(self) > self.window and self.raw.shape[1] >= self.chunk_len:
            chunk = self.raw[:, : self.chunk_len]  # (1, c)
            out = self.embedder(chunk)[:, self.select]  # (1, m, dim)
            self.comp = torch.cat([self.comp, out.to(self.comp.dtype)], dim=1)
            self.raw = self.raw[:, self.chunk_len :]
            self.condensed += self.chunk_len
        excess = len(self) - self.window
        if excess > 0:
            self.comp = self.comp[:, excess:]
            self.dropped += excess

    def inputs(self) -> torch.Tensor:
        """(1, len, dim): what the LLM reads, compressed first."""
        return torch.cat([self.comp, self.llm.embed_tokens(self.raw)], dim=1)

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """(1, len, V): the frozen LLM over the window; the last row predicts the next token."""
        return self.llm(inputs_embeds=self.inputs())
