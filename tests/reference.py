"""Independent reference: plain single-process attention in fp64, written from the definition."""

from __future__ import annotations

import math

import torch


def reference_attention(q, k, v, *, causal: bool, scale: float | None = None) -> torch.Tensor:
    """q (B, S, H, D), k/v (B, S, H_kv, D) full sequences -> (B, S, H, D) in fp64.

    softmax(q k^T * scale + mask) v with K/V heads repeated for GQA; differentiable.
    """
    q, k, v = (x.double() for x in (q, k, v))
    heads, kv_heads = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        s = q.shape[1]
        keep = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
