"""Config of Extensible Tokenization (the ``compression`` section of the train and eval jobs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .select import check_k


@dataclass(kw_only=True, slots=True)
class CompressionConfig:
    """A frozen LLM reads long context as [compressed embeddings of earlier chunks; raw recent tokens].

    Train (``ringrt train --compression.enabled true --train.init_from <llm>``): only the embedder
    trains, by two-stream auto-regression; the LLM is frozen. Eval (``ringrt eval --compression.enabled
    true --compression.embedder <dir>``): perplexity of the last chunk of long documents with
    truncation, the Λ-mask and Extensible Tokenization at each k, sequence-parallel over all ranks.
    """

    enabled: bool = False
    """Run the train / eval job for the extensible embedder instead of the plain LLM job."""
    embedder_layers: int | None = None
    """The embedder is a trainable copy of the LLM's token embedding and first ``embedder_layers``
    blocks. None = 8 (the paper's choice), or every block of a model with fewer than 8."""
    chunk_len: int = 64
    """Tokens per chunk; chunks are encoded independently (the paper: 512 in training, 4096 at inference)."""
    ks: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])
    """Down-scaling factors. Training samples one per example; inference picks the smallest that fits."""
    k: int | None = None
    """A fixed factor for every example/query instead (None = sample from / choose in ``ks``)."""
    train_chunks: int = 8
    """Chunks per training example; chunks 2..n are scored, packed in one window behind the shared
    compressed prefix."""
    train_minutes: float | None = None
    """Train: stop after this much wall time even before ``train.steps`` (the schedule still spans
    ``train.steps``); None = no limit."""
    window: int | None = None
    """The LLM's context window in embeddings; None = its training length (``ringrt.json``) or data.seq_len."""
    raw_len: int | None = None
    """Eval: the last tokens of each document, read raw and scored; None = ``chunk_len``."""
    doc_len: int = 2048
    """Eval: tokens per document (context + raw tail)."""
    embedder: str | None = None
    """Eval: the trained embedder directory (``<train.out_dir>/embedder``)."""
    baselines: list[Literal["none", "truncate", "lambda"]] = field(default_factory=lambda: ["none", "truncate", "lambda"])
    """Eval: the baselines measured next to Extensible Tokenization: ``none`` = the raw tail alone (no
    context: what the compressed context must beat), ``truncate`` = the last ``window`` tokens,
    ``lambda`` = the whole document under the Λ-mask."""

    def validate(self) -> None:
        """ValueError naming the first bad setting."""
        if self.embedder_layers is not None and self.embedder_layers < 1:
            raise ValueError(f"compression.embedder_layers={self.embedder_layers} must be a positive integer or None")
        for name in ("chunk_len", "doc_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"compression.{name}={getattr(self, name)} must be a positive integer")
        if self.train_chunks < 2:
            raise ValueError(f"compression.train_chunks={self.train_chunks} must be at least 2 (chunk 1 is context only)")
        if not self.ks:
            raise ValueError("compression.ks=[] must list at least one factor, e.g. [2, 4, 8, 16, 32]")
        for k in self.ks:
            check_k(k, "compression.ks")
        if self.k is not None:
            check_k(self.k)
        if self.window is not None and self.window < 2:
            raise ValueError(f"compression.window={self.window} must be at least 2")
        if self.raw_len is not None and not 1 <= self.raw_len < self.doc_len:
            raise ValueError(f"compression.raw_len={self.raw_len} must be in [1, compression.doc_len={self.doc_len})")
        bad = [b for b in self.baselines if b not in ("none", "truncate", "lambda")]
        if bad:
            raise ValueError(f"compression.baselines={self.baselines}: {bad} unknown; valid: 'none', 'truncate', 'lambda'")

    def factors(self) -> list[int]:
        """The factors in use: [k] when fixed, else ``ks`` sorted."""
        return [self.k] if self.k is not None else sorted(self.ks)

    def resolved_raw_len(self) -> int:
        return self.raw_len if self.raw_len is not None else self.chunk_len
