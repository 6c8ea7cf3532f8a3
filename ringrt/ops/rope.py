"""Rotary position embedding, Hugging Face Llama convention (``rotate_half``). Pure math.

Tensors are (B, S, H, D); ``positions`` are absolute token positions (S,) or (B, S), so a shard in
any layout gets the rotation of its true positions.
"""

from __future__ import annotations

import torch


def inv_freq(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 frequencies theta^(-2i/head_dim)."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, head_dim), computed in fp32 then cast to ``dtype``."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq(head_dim, theta, positions.device)  # (..., D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (..., D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D); cos/sin (S, D) or (B, S, D) -> x rotated, same shape and dtype."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)  # (B|1, S, 1, D)
    return x * cos + rotate_half(x) * sin
