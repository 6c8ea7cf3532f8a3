"""A Llama-family decoder, readable top to bottom: RMSNorm, RoPE, grouped-query attention, SwiGLU.

The model knows nothing about processes. It runs on one shard of a long sequence: ``positions``
are the absolute positions of the shard's tokens (any layout, see ``ringrt.ops.layout.positions``), and
the attention over the whole sequence is injected as ``attend`` (see ``ringrt/model/parallel.py``
for TokenRing / the other ring algorithms / the Λ-mask / a sharded decode cache). Without
``attend`` it is plain causal attention on one process. With ``cu_seqlens`` the sequence is packed
documents: positions restart in each (the caller's ``positions``), and no token attends across a
document boundary (the attention is given ``cu_seqlens``; see ``ringrt/model/parallel.py``).

Module names follow Hugging Face's ``LlamaForCausalLM`` (without its ``model.`` prefix), so a
checkpoint maps onto it one name at a time (``ringrt/model/hf.py``).

``forward(..., checkpoint=True)`` keeps only each block's input for the backward and runs the block
again there (``torch.utils.checkpoint``, non-reentrant), the MLP in slices of ``MLP_SLICE`` tokens so
its four (S, intermediate) tensors exist for one slice at a time; with ``hidden_only=True`` the
caller computes the LM head and the loss in chunks (``ringrt.model.loss``). Note [activation
memory] in ``ringrt/model/memory.py`` counts the bytes per token either way.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _recompute

from ..ops.documents import lengths_problem
from ..ops.rope import apply_rope, cos_sin
from .config import ModelConfig


class Attend(Protocol):
    """Attention over the whole (sharded) sequence, for one layer.

    ``rotates``: False -> called with q, k already rotated (RoPE at their absolute positions);
    True -> called with q, k before RoPE (the Λ-mask rotates them itself: its global branch needs
    unrotated keys) and ``positions``.

    An attention with the class attribute ``documents = True`` also takes ``cu_seqlens=`` (packed
    documents; it is passed only when the model is given one).
    """

    rotates: bool

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """q (B, S, H, D), k/v (B, S, H_kv, D) -> (B, S, H, D)."""
        ...


class LocalAttention:
    """Plain causal attention over an unsharded sequence (the one-process path and the reference);
    with ``cu_seqlens`` ([0, L_0, L_0 + L_1, ..., S] over the rows, the same for every batch row)
    causal attention within each document, one document at a time."""

    rotates = False
    documents = True

    def __call__(self, q, k, v, *, layer, positions, cu_seqlens=None):
        if cu_seqlens is not None:
            problem = lengths_problem(cu_seqlens)
            bounds = cu_seqlens.tolist() if problem is None else []
            if problem is None and bounds[-1] != q.shape[1]:
                problem = f"cu_seqlens must end at the {q.shape[1]} rows of the sequence, got {bounds}"
            if problem:
                raise ValueError(problem)
            parts = [self(q[:, a:b], k[:, a:b], v[:, a:b], layer=layer, positions=positions[..., a:b])
                     for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
            return torch.cat(parts, dim=1)
        groups = q.shape[2] // k.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, D)
        return y.transpose(1, 2)  # (B, S, H, D)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_size, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_size, cfg.dim, bias=False)

    def forward(self, x, cos, sin, positions, attend: Attend, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)  # (B, S, H, D)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim)  # (B, S, H_kv, D)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)  # (B, S, H_kv, D)
        if not attend.rotates:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        docs = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        y = attend(q, k, v, layer=self.layer, positions=positions, **docs)  # (B, S, H, D)
        return self.o_proj(y.reshape(B, S, self.n_heads * self.head_dim))


MLP_SLICE = 8192
"""Tokens per MLP slice under checkpointing (each slice recomputed on its own in the backward)."""


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_size, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def sliced(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """forward(x) over ``size`` (default ``MLP_SLICE``) tokens at a time, each slice checkpointed: the
        backward holds one slice's (size, intermediate) tensors, not the sequence's. x (B, S, dim)."""
        size = MLP_SLICE if size is None else size
        if x.shape[1] <= size:
            return _recompute(self, x, use_reentrant=False)
        return torch.cat([_recompute(self, x[:, a : a + size], use_reentrant=False) for a in range(0, x.shape[1], size)], dim=1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = SelfAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, attend: Attend, cu_seqlens: torch.Tensor | None = None, sliced: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, attend, cu_seqlens)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp.sliced(h) if sliced else self.mlp(h))


class Llama(nn.Module):
    """``Llama(cfg)(input_ids)`` -> logits. input_ids (B, S) int64 -> (B, S, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 style: residual outputs scaled by depth
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        attend: Attend | None = None,
        hidden_only: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, S): this shard's tokens; positions (S,) or (B, S): their absolute positions
        (default 0..S-1); attend: attention over the whole sequence (default one process, causal);
        inputs_embeds (B, S, dim): read in place of ``embed_tokens(input_ids)`` (give one of the two);
        cu_seqlens: packed documents, passed to the attention (which must take it: ``documents = True``),
        with ``positions`` restarting in each document (``Shard.positions`` of ``shard_batch``).
        checkpoint: recompute each block in the backward (and its MLP a slice at a time) instead of
        keeping its activations; values and gradients are the same. The attention then runs twice
        per layer, forward and recompute, in the same order on every rank.
        Returns logits (B, S, vocab), or the final hidden states (B, S, dim) with ``hidden_only``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Llama.forward takes exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, dim)
        B, S = x.shape[:2]
        if positions is None:
            positions = torch.arange(S, device=x.device)
        attend = LocalAttention() if attend is None else attend
        if cu_seqlens is not None and not getattr(attend, "documents", False):
            raise ValueError(f"{type(attend).__name__} does not take document boundaries (cu_seqlens); packed documents "
                             f"need the plain ring attention or the one-process attention (not the Λ-mask or a KV cache)")
        cos, sin = cos_sin(positions, self.config.head_size, self.config.rope_theta)  # (S|B,S, D) fp32
        for block in self.layers:
            if checkpoint and torch.is_grad_enabled():
                x = _recompute(block, x, cos, sin, positions, attend, cu_seqlens, True, use_reentrant=False)  # keeps x only
            else:
                x = block(x, cos, sin, positions, attend, cu_seqlens)
        x = self.norm(x)  # (B, S, dim)
        return x if hidden_only else self.lm_head(x)  # (B, S, vocab)
