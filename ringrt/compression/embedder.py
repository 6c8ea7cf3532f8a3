"""The extensible embedder: turns chunks of tokens into one output embedding per token, chunk by
chunk, in the LLM's input-embedding space.

Default: a trainable copy of the LLM's token embedding and first ``n_layers`` blocks (8 in the paper),
then an RMSNorm whose weight starts at the RMS of the LLM's token embeddings, so its outputs start
on the scale the LLM's first layer expects. Any ``nn.Module`` with the same call works instead:

    embedder(input_ids (N, c) int64) -> (N, c, dim)      # N independent chunks of c tokens

Chunks never see each other: each is encoded at positions 0..c-1 on its own.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ..model.llama import Llama, LocalAttention, RMSNorm
from ..ops.rope import cos_sin
from .select import chunk_lengths
from ..run.rundir import as_if_opened

EMBEDDER_CONFIG = "embedder.json"
EMBEDDER_WEIGHTS = "embedder.safetensors"


def default_layers(llm: Llama, n_layers: int | None) -> int:
    """``n_layers``, or 8 (the paper) / every block of a shallower LLM when None; ValueError if too many."""
    total = llm.config.n_layers
    if n_layers is None:
        return min(8, total)
    if not 1 <= n_layers <= total:
        raise ValueError(f"compression.embedder_layers={n_layers} must be in [1, {total}] (the LLM has {total} blocks)")
    return n_layers


class ExtensibleEmbedder(nn.Module):
    """A trainable copy of the first ``n_layers`` blocks of ``llm`` (the LLM itself is not touched)."""

    def __init__(self, llm: Llama, n_layers: int | None = None):
        """On the LLM's device (its copied blocks are there; the new norm is put there)."""
        super().__init__()
        n = default_layers(llm, n_layers)
        self.config = llm.config
        self.n_layers = n
        self.embed_tokens = copy.deepcopy(llm.embed_tokens)
        self.layers = nn.ModuleList(copy.deepcopy(llm.layers[i]) for i in range(n))
        self.out_norm = RMSNorm(llm.config.dim, llm.config.norm_eps).to(llm.embed_tokens.weight.device)
        with torch.no_grad():
            rms = llm.embed_tokens.weight.float().pow(2).mean(-1).sqrt().mean()
            self.out_norm.weight.fill_(rms)  # a device tensor: no host read
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (N, c): N chunks, each encoded alone at positions 0..c-1 -> (N, c, dim)."""
        c = input_ids.shape[1]
        positions = torch.arange(c, device=input_ids.device)
        cos, sin = cos_sin(positions, self.config.head_size, self.config.rope_theta)  # (c, D)
        x = self.embed_tokens(input_ids)  # (N, c, dim)
        attend = LocalAttention()
        for block in self.layers:
            x = block(x, cos, sin, positions, attend)
        return self.out_norm(x)  # (N, c, dim)


def encode_chunks(embedder: nn.Module, input_ids: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Embedder outputs of a context, chunk by chunk.

    input_ids (B, N) -> (B, N, dim). Full chunks go through the embedder as one batch of B·(N // c)
    chunks; a shorter last chunk goes separately. Outputs of chunk j depend on chunk j's tokens only.
    """
    B, N = input_ids.shape
    lengths = chunk_lengths(N, chunk_len)
    full = N // chunk_len
    parts = []
    if full:
        x = input_ids[:, : full * chunk_len].reshape(B * full, chunk_len)  # (B·full, c)
        parts.append(embedder(x).reshape(B, full * chunk_len, -1))  # (B, full·c, dim)
    if len(lengths) > full:
        parts.append(embedder(input_ids[:, full * chunk_len :]))  # (B, rest, dim)
    return torch.cat(parts, dim=1)


def save_embedder(embedder: ExtensibleEmbedder, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``embedder.safetensors`` then ``embedder.json`` into ``path``, each through a temporary
    file renamed into place (a reader never sees a half-written file)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in embedder.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=p, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    save_file(state, tmp)
    as_if_opened(tmp)
    os.replace(tmp, p / EMBEDDER_WEIGHTS)
    meta = {"n_layers": embedder.n_layers, **(extra or {})}
    fd, tmp = tempfile.mkstemp(dir=p, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
    as_if_opened(tmp)
    os.replace(tmp, p / EMBEDDER_CONFIG)
    return p


def load_embedder(path: str | os.PathLike, llm: Llama) -> tuple[ExtensibleEmbedder, dict]:
    """(embedder, its ``embedder.json``) from a directory written by :func:`save_embedder`, shaped
    after ``llm``; ValueError naming the file when it is missing or does not match."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / EMBEDDER_CONFIG).is_file() or not (p / EMBEDDER_WEIGHTS).is_file():
        raise ValueError(f"compression.embedder={str(path)!r} must be a directory holding {EMBEDDER_CONFIG} and "
                         f"{EMBEDDER_WEIGHTS} (written by ringrt train --compression.enabled true)")
    meta = json.loads((p / EMBEDDER_CONFIG).read_text())
    emb = ExtensibleEmbedder(llm, meta["n_layers"])
    state = load_file(str(p / EMBEDDER_WEIGHTS))
    try:
        emb.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{p / EMBEDDER_WEIGHTS} does not match an embedder of this LLM: {e}") from None
    return emb, meta
