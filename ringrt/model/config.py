"""Configs of the model and of its attention. Plain dataclasses: any entry point (CLI flags, Hydra,
Python) fills them in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """A Llama-family decoder: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention.

    The defaults are Hydra's default model group, ``conf/model/tiny.yaml`` (a few-MB model for CPU
    runs); ``conf/model/small.yaml`` is dim 256, 4 layers."""

    vocab_size: int = 259
    """Tokens in the vocabulary; 259 = 256 bytes + <bos>, <eos>, <pad> of the byte tokenizer."""
    dim: int = 64
    """Hidden size."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int | None = 2
    """Key/value heads (GQA); ``n_heads`` must be a multiple. None = ``n_heads`` (plain multi-head)."""
    head_dim: int | None = None
    """Per-head size; None = dim // n_heads."""
    intermediate_size: int | None = None
    """SwiGLU hidden size; None = 8/3 * dim rounded up to a multiple of 64."""
    norm_eps: float = 1e-5
    """Added to the mean square in RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding's frequencies."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection (``lm_head``)."""
    max_position_embeddings: int = 2048
    """Recorded in the Hugging Face config; attention itself has no length limit."""

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def hidden_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-int(8 * self.dim / 3) // 64) * 64

    def validate(self) -> None:
        """ValueError naming the first bad setting."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be a positive integer")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be a multiple of model.n_heads={self.n_heads} (or set model.head_dim)")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        if self.head_size % 2:
            raise ValueError(f"head size {self.head_size} must be even for rotary embeddings")
        if not self.rope_theta > 0:
            raise ValueError(f"model.rope_theta={self.rope_theta} must be positive")


@dataclass(kw_only=True, slots=True)
class AttentionConfig:
    """How the attention layers run over a sharded sequence."""

    algorithm: str = "tokenring"
    """A name in ``ringrt.ALGORITHMS`` (``tokenring``, and the others registered there)."""
    layout: Literal["zigzag", "contiguous"] | None = None
    """How sequences are sharded; None = zigzag (balanced causal work), contiguous under the Λ-mask."""
    lambda_mask: bool = False
    """LM-Infinite Λ-mask: each query sees the first ``n_global`` and the last ``n_local`` tokens."""
    n_global: int = 8
    """Λ-mask: leading tokens every query attends to."""
    n_local: int | None = None
    """Λ-mask: local window (including the query itself); None = the training sequence length."""
    limit_distance: int | None = None
    """Λ-mask: relative distances are capped here; None = ``n_local``."""

    def resolved_layout(self) -> str:
        if self.layout is not None:
            return self.layout
        return "contiguous" if self.lambda_mask else "zigzag"
