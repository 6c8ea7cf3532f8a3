"""Two-stream auto-regression, the embedder's training objective, computed naively and packed.

An example is n chunks X_0 .. X_{n-1} of c tokens. With ``comp_j`` = the k-down-scaled embedder
outputs of X_j (m = ceil(c / k) embeddings), chunk i >= 1 is predicted from the compressed
embeddings of the chunks before it plus its own earlier raw tokens:

    LLM input  [comp_0 .. comp_{i-1} ; emb(X_i[0]) .. emb(X_i[c-2])]     positions 0 .. M_i + c - 2
    targets    the last comp embedding (M_i - 1) predicts X_i[0]; raw token t predicts X_i[t + 1]

(M_i = i·m). Every chunk i >= 1 scores all its c tokens; the loss is their mean.

Packed: one sequence holds the compressed stream once and every raw segment behind it,
``[comp_0 .. comp_{n-2} ; R_1 ; .. ; R_{n-1}]``, R_i = emb(X_i[0 : c-1]) at positions M_i .. M_i + c - 2,
under a block mask (1 = attends). n = 3, m = 2, c = 3 (segments of c - 1 = 2 tokens)::

              comp_0  comp_1   R_1   R_2
    comp_0 a   1 .     . .     . .   . .
           b   1 1     . .     . .   . .
    comp_1 a   1 1     1 .     . .   . .
           b   1 1     1 1     . .   . .
    R_1    0   1 1     . .     1 .   . .
           1   1 1     . .     1 1   . .
    R_2    0   1 1     1 1     . .   1 .
           1   1 1     1 1     . .   1 1

The compressed stream is causal within itself, so its first M_i rows are exactly what the naive pass
for chunk i computes; each R_i row sees what it sees there. Same positions, same keys: same loss
(``tests/test_compression.py`` checks it against :func:`naive_two_stream_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.llama import Llama
from .embedder import encode_chunks
from .select import downscale


class MaskedAttend:
    """Attention under an explicit boolean mask (S, S), True = attends; one process, no ring."""

    rotates = False

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, q, k, v, *, layer, positions):
        groups = q.shape[2] // k.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)  # (B, H, S, D)
        return y.transpose(1, 2)  # (B, S, H, D)


@dataclass(frozen=True, slots=True)
class PackedLayout:
    """Where everything sits in the packed sequence of an n-chunk example at factor k."""

    n_comp: int  # M = (n - 1)·m compressed embeddings (chunks 0 .. n-2)
    positions: torch.Tensor  # (S,) int64: compressed 0..M-1, then R_i at M_i .. M_i + c - 2
    mask: torch.Tensor  # (S, S) bool, True = attends
    comp_rows: torch.Tensor  # (n - 1,) int64: rows M_i - 1 that predict X_i[0], i = 1..n-1


def packed_layout(n_chunks: int, chunk_len: int, k: int) -> PackedLayout:
    """The positions, block mask and first-token rows of a packed example (pure index math)."""
    c, m = chunk_len, -(-chunk_len // k)
    M, seg = (n_chunks - 1) * m, c - 1
    S = M + (n_chunks - 1) * seg
    mask = torch.zeros(S, S, dtype=torch.bool)
    mask[:M, :M] = torch.ones(M, M, dtype=torch.bool).tril()
    pos = [torch.arange(M)]
    for i in range(1, n_chunks):
        r0 = M + (i - 1) * seg
        mask[r0 : r0 + seg, : i * m] = True
        mask[r0 : r0 + seg, r0 : r0 + seg] = torch.ones(seg, seg, dtype=torch.bool).tril()
        pos.append(torch.arange(i * m, i * m + seg))
    comp_rows = torch.tensor([i * m - 1 for i in range(1, n_chunks)], dtype=torch.int64)
    return PackedLayout(M, torch.cat(pos), mask, comp_rows)


def _check(tokens: torch.Tensor, chunk_len: int) -> int:
    if tokens.dim() != 2 or tokens.shape[1] % chunk_len or tokens.shape[1] // chunk_len < 2 or chunk_len < 2:
        raise ValueError(f"two-stream examples must be (B, n·chunk_len) tokens with n >= 2 and chunk_len >= 2; got "
                         f"shape {tuple(tokens.shape)} with compression.chunk_len={chunk_len}")
    return tokens.shape[1] // chunk_len


def naive_two_stream_loss(llm: Llama, embedder: nn.Module, tokens: torch.Tensor, *, chunk_len: int, k: int) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of scored tokens), one LLM pass per scored chunk (the reference).

    tokens (B, n·c) int64; all B examples use factor k.
    """
    n, c = _check(tokens, chunk_len), chunk_len
    B = tokens.shape[0]
    comps = [downscale(embedder(tokens[:, j * c : (j + 1) * c]), k) for j in range(n - 1)]  # each (B, m, dim)
    total = torch.zeros((), dtype=torch.float64, device=tokens.device)
    for i in range(1, n):
        x = tokens[:, i * c : (i + 1) * c]  # (B, c)
        inp = torch.cat([*comps[:i], llm.embed_tokens(x[:, :-1])], dim=1)  # (B, M_i + c - 1, dim)
        logits = llm(inputs_embeds=inp)  # (B, M_i + c - 1, V)
        scored = logits[:, -c:]  # last comp row predicts x[:, 0]; raw rows predict x[:, 1:]
        total = total + F.cross_entropy(scored.flatten(0, 1).double(), x.flatten(), reduction="sum")
    return total, B * (n - 1) * c


def packed_two_stream_loss(llm: Llama, embedder: nn.Module, tokens: torch.Tensor, *, chunk_len: int, k: int) -> tuple[torch.Tensor, int]:
    """Same value as :func:`naive_two_stream_loss`, in one LLM pass over the packed sequence.

    tokens (B, n·c) int64 on the models' device; all B examples use factor k. The embedder encodes
    chunks 0..n-2 as one batch (the last chunk is only ever read raw).
    """
    n, c = _check(tokens, chunk_len), chunk_len
    B = tokens.shape[0]
    lay = packed_layout(n, c, k)  # (CPU index math)
    positions, comp_rows = lay.positions.to(tokens.device), lay.comp_rows.to(tokens.device)
    comp = downscale(encode_chunks(embedder, tokens[:, : (n - 1) * c], c), k, [c] * (n - 1))  # (B, M, dim)
    chunks = tokens.view(B, n, c)[:, 1:]  # (B, n-1, c): the scored chunks
    raw = llm.embed_tokens(chunks[:, :, :-1].reshape(B, -1))  # (B, (n-1)(c-1), dim)
    inp = torch.cat([comp, raw], dim=1)  # (B, S, dim)
    logits = llm(inputs_embeds=inp, positions=positions, attend=MaskedAttend(lay.mask.to(tokens.device)))
    first = logits[:, comp_rows]  # (B, n-1, V): predicts X_i[0]
    rest = logits[:, lay.n_comp :].reshape(B, n - 1, c - 1, -1)  # (B, n-1, c-1, V): predicts X_i[1:]
    total = (F.cross_entropy(first.flatten(0, 1).double(), chunks[:, :, 0].flatten(), reduction="sum")
             + F.cross_entropy(rest.flatten(0, 2).double(), chunks[:, :, 1:].flatten(), reduction="sum"))
    return total, B * (n - 1) * c


def freeze(llm: nn.Module) -> nn.Module:
    """Switch off gradients of every LLM parameter (in place); returns ``llm``."""
    for p in llm.parameters():
        p.requires_grad_(False)
    return llm
