"""Attention of a few new queries over cached keys, grouped-query without copying K/V. Pure torch.

The decode caches (``ringrt.lm_infinite.LambdaKVCache``, ``ringrt.model.kvcache.FullKVCache``) attend
T new queries (B, T, H, D) to keys and values kept heads-first (B, H_kv, n, D). The g = H / H_kv query
heads that share a K/V head are folded into the row dimension::

    q (B, T, H_kv*g, D)  ->  (B, H_kv, g*T, D)      row j*T + i of K/V head h = query i of head h*g + j

so one matmul per part scores every query head against its K/V head, and the output is unfolded back.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .merge import acc_dtype


def softmax_over_parts(parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, scale: float,
                       bias: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """One softmax over every part's scores, then the weighted sum of every part's values.

    parts: (q (B, T, H, D) as that part sees it, k (B, H_kv, n_j, D), v (B, H_kv, >= n_j, D)); bias:
    per part an additive (T, n_j) bias (-inf: not seen) or None. Scores in fp32 (fp64 for fp64 q).
    Returns (B, T, H, D) in v's dtype.
    """
    b, t, h, d = parts[0][0].shape
    hk = parts[0][1].shape[1]
    g = h // hk
    scores = []
    for j, (qq, kk, _) in enumerate(parts):
        qg = qq.reshape(b, t, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * t, d)  # (B, H_kv, g*T, D)
        s = (qg @ kk.transpose(-1, -2)).to(acc_dtype(qq.dtype)) * scale  # (B, H_kv, g*T, n_j)
        if bias is not None:
            s = s.view(b, hk, g, t, -1).add_(bias[j]).view(b, hk, g * t, -1)
        scores.append(s)
    p = torch.softmax(torch.cat(scores, -1) if len(scores) > 1 else scores[0], dim=-1)
    out, lo = None, 0
    for (_, _kk, vv), s in zip(parts, scores, strict=True):
        n = s.shape[-1]
        o = p[..., lo : lo + n].to(vv.dtype) @ vv[:, :, :n]  # (B, H_kv, g*T, D)
        out, lo = (o if out is None else out + o), lo + n
    return out.view(b, hk, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h, d)  # (B, T, H, D)
