"""Offline mode: encode a context once, keep the embedder outputs on disk, pick k at query time.

The cache stores the outputs selected at a base factor ``base_k`` (1 = every output) with their
token indices inside their chunk. Because the selection at any multiple of ``base_k`` is a subset
of the base selection (``select.py``), ``compressed(k)`` is an index pick — no re-encoding — and
equals encoding afresh at k exactly. Storage: ceil(N / base_k)·dim values instead of N·dim.

On disk: one ``.safetensors`` file (outputs, token ids, chunk offsets) written to a temporary name
and renamed into place, so a cache file is either complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .embedder import encode_chunks
from .select import check_k, choose_k, chunk_lengths, downscale, select_indices
from ..run.rundir import as_if_opened


def _digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


@dataclass(kw_only=True, slots=True)
class EmbeddingCache:
    """Embedder outputs of one context (batch 1), kept at factor ``base_k``."""

    outputs: torch.Tensor
    """(M_base, dim): the outputs at the base selection, chunks in order."""
    offsets: torch.Tensor
    """(M_base,) int64: each output's token index inside its chunk."""
    lengths: list[int]
    """Chunk lengths of the context."""
    chunk_len: int
    base_k: int
    digest: str
    """SHA-256 of the context's token ids (int64), to refuse a cache of another context."""

    @classmethod
    @torch.no_grad()
    def build(cls, embedder, context: torch.Tensor, *, chunk_len: int, base_k: int = 1) -> "EmbeddingCache":
        """Encode ``context`` (N,) or (1, N) token ids (any device) once, chunk by chunk, on the
        embedder's device, where the cache then lives."""
        from ..distributed.device import module_device

        check_k(base_k, "base_k")
        ids = context.reshape(1, -1).to(module_device(embedder))
        lengths = chunk_lengths(ids.shape[1], chunk_len)
        out = downscale(encode_chunks(embedder, ids, chunk_len), base_k, lengths)[0]  # (M_base, dim)
        offsets = torch.cat([select_indices(c, base_k) for c in lengths]).to(out.device)
        return cls(outputs=out, offsets=offsets, lengths=lengths, chunk_len=chunk_len, base_k=base_k, digest=_digest(ids))

    def compressed(self, k: int) -> torch.Tensor:
        """(1, compressed_len, dim): the context at factor k (a multiple of ``base_k``), as
        ``downscale(encode_chunks(embedder, context), k)`` would give it."""
        check_k(k)
        if k % self.base_k:
            raise ValueError(f"k={k} is not a multiple of the cache's base_k={self.base_k}; valid: multiples of {self.base_k}")
        dev = self.offsets.device
        ends = torch.tensor(self.lengths, device=dev)
        counts = [-(-c // self.base_k) for c in self.lengths]  # outputs per chunk at base_k
        chunk_of = torch.repeat_interleave(torch.arange(len(self.lengths), device=dev), torch.tensor(counts, device=dev),
                                           output_size=sum(counts))  # the size given: no host sync on a GPU
        last = ends[chunk_of] - 1  # (M_base,) each output's chunk-last index
        keep = ((self.offsets + 1) % k == 0) | (self.offsets == last)
        return self.outputs[keep][None]

    def choose_k(self, n_raw: int, *, window: int, ks: list[int]) -> int:
        """The smallest usable k in ``ks`` (a multiple of ``base_k``) whose compressed context plus
        ``n_raw`` raw tokens fit ``window``."""
        usable = [k for k in ks if k % self.base_k == 0]
        if not usable:
            raise ValueError(f"ks={ks} holds no multiple of the cache's base_k={self.base_k}")
        return choose_k(sum(self.lengths), n_raw, window=window, chunk_len=self.chunk_len, ks=usable)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache to ``path`` (a ``.safetensors`` file) atomically."""
        from safetensors.torch import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        meta = {"lengths": json.dumps(self.lengths), "chunk_len": str(self.chunk_len), "base_k": str(self.base_k),
                "digest": self.digest}
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"outputs": self.outputs.to("cpu").contiguous(), "offsets": self.offsets.to("cpu").contiguous()}, tmp,
                      metadata=meta)
            as_if_opened(tmp)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike, *, context: torch.Tensor | None = None) -> "EmbeddingCache":
        """Read a cache; with ``context``, ValueError unless it is the context the cache was built from."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise ValueError(f"cache path {str(p)!r} is not a file (build it with EmbeddingCache.build(...).save(path))")
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in ("outputs", "offsets")}
        cache = cls(outputs=tensors["outputs"], offsets=tensors["offsets"], lengths=json.loads(meta["lengths"]),
                    chunk_len=int(meta["chunk_len"]), base_k=int(meta["base_k"]), digest=meta["digest"])
        if context is not None and _digest(context.reshape(1, -1)) != cache.digest:
            raise ValueError(f"cache {str(p)!r} was built from another context (token ids differ)")
        return cache
