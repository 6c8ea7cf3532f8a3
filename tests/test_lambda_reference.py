"""Independent reference for Λ-mask attention: the formula written plainly, one process, any dtype.

It shares no code with ringrt (its own RoPE, its own masks). The tests here pin it to
LM-Infinite's own construction (``models/llama.py`` + ``models/lambda_attention.py``): global-branch
queries rotated to one position min(limit_distance, N - 1), keys unrotated.
"""

from __future__ import annotations

import math

import pytest
import torch


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, S, H, D) rotated to positions pos (S,), Hugging Face rotate_half convention, in x.dtype
    (angles in fp64 for fp64 x)."""
    d = x.shape[-1]
    adt = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos.to(adt)[:, None] * inv.to(adt)[None, :]  # (S, D/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def lambda_reference(q, k, v, *, n_global, n_local, limit=None, theta=10000.0, scale=None, offset=0,
                     dtype=torch.float64, lm_infinite_prefill=False):
    """q (B, N, H, D), k/v (B, N, H_kv, D) pre-RoPE, full sequences -> (B, N, H, D) in ``dtype``.

    score(i, j) = rope(q_i, i) . rope(k_j, j)                 if 0 <= i - j < n_local
                = rope(q_i, min(limit, i)) . k_j              if j < n_global and i - j >= n_local
                = -inf                                        otherwise
    (lm_infinite_prefill: min(limit, N - 1) for every query, as LM-Infinite's prefill does.)
    """
    q, k, v = (x.to(dtype) for x in (q, k, v))
    b, n, h, d = q.shape
    limit = n_local if limit is None else limit
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    v = v.repeat_interleave(h // v.shape[2], dim=2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    i = torch.arange(n)
    qr, kr = rope(q, i + offset, theta), rope(k, i + offset, theta)
    cap = torch.full((n,), min(limit, n - 1)) if lm_infinite_prefill else torch.clamp(i, max=limit)
    qs = rope(q, cap, theta)
    s_local = torch.einsum("bqhd,bkhd->bhqk", qr, kr) * scale
    s_global = torch.einsum("bqhd,bkhd->bhqk", qs, k) * scale
    dist = i[:, None] - i[None, :]
    local = (dist >= 0) & (dist < n_local)
    glob = (i[None, :] < n_global) & (dist >= n_local)
    scores = torch.where(local, s_local, torch.where(glob, s_global, torch.full_like(s_local, float("-inf"))))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v)


def _qkv(n, h=2, kvh=1, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, x, d, generator=g, dtype=torch.float64) for x in (h, kvh, kvh)]


@pytest.mark.timeout(30)
def test_reference_matches_lm_infinite_construction_when_limit_at_most_n_local():
    """LM-Infinite's prefill uses one cap min(limit, N-1); our per-query min(limit, i) is the same
    whenever limit <= n_local, and differs (only for n_local <= i < limit) otherwise."""
    q, k, v = _qkv(20)
    for ng, nl, lim in [(2, 5, None), (3, 4, 2), (1, 6, 6), (0, 3, None)]:
        a = lambda_reference(q, k, v, n_global=ng, n_local=nl, limit=lim)
        b = lambda_reference(q, k, v, n_global=ng, n_local=nl, limit=lim, lm_infinite_prefill=True)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    a = lambda_reference(q, k, v, n_global=2, n_local=4, limit=9)
    b = lambda_reference(q, k, v, n_global=2, n_local=4, limit=9, lm_infinite_prefill=True)
    assert not torch.allclose(a[:, 4:9], b[:, 4:9])  # rows 4..8: cap i vs cap 9
    torch.testing.assert_close(a[:, 9:], b[:, 9:], rtol=0, atol=1e-13)


@pytest.mark.timeout(30)
def test_reference_small_case_by_hand():
    """N = 3, n_local = 1, n_global = 1: token 0 sees itself; token 2 sees key 0 (global, query rotated
    to min(limit=1, 2) = 1, key unrotated) and itself (local)."""
    q, k, v = _qkv(3, h=1, kvh=1, d=4, seed=3)
    out = lambda_reference(q, k, v, n_global=1, n_local=1)
    torch.testing.assert_close(out[0, 0], v[0, 0], rtol=0, atol=1e-15)
    s_g = (rope(q[:, 2:3], torch.tensor([1]), 1e4) * k[:, 0:1]).sum() / 2
    s_l = (rope(q[:, 2:3], torch.tensor([2]), 1e4) * rope(k[:, 2:3], torch.tensor([2]), 1e4)).sum() / 2
    w = torch.softmax(torch.stack([s_g, s_l]), 0)
    torch.testing.assert_close(out[0, 2, 0], w[0] * v[0, 0, 0] + w[1] * v[0, 2, 0], rtol=0, atol=1e-14)
