"""Plain attention written from the definition, the yardstick of the acceptance check.

Layout (B, H, S, D) like the block kernels; K/V may have fewer heads (GQA: head h reads kv head
h // (H / H_kv)). ``attend(..., upcast=True)`` computes in fp64 (the reference);
``upcast=False`` computes the way plain PyTorch code does in the inputs' precision (scores and the
P·V product in that dtype, softmax in fp32): a kernel may be off the fp64 reference by at most
twice what that same-precision computation is off (flash-attention's rule for its own tests).

A row whose mask hides every key returns out = 0 and lse = -inf and passes no gradient, the
block kernels' contract.
"""

from __future__ import annotations

import torch


def attend(q, k, v, *, causal: bool, mask: torch.Tensor | None, scale: float, upcast: bool):
    """q (B, H, Sq, D), k/v (B, H_kv, Sk, D), mask additive (Sq, Sk) or None; top-left causal.

    Returns (out (B, H, Sq, D), lse (B, H, Sq)), differentiable w.r.t. q, k, v; fp64 when
    ``upcast``, else out in q.dtype and lse in fp32.
    """
    dt = torch.float64 if upcast else q.dtype
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.to(dt), k.to(dt).repeat_interleave(g, dim=1), v.to(dt).repeat_interleave(g, dim=1)
    sq, sk = q.shape[2], k.shape[2]
    bias = torch.zeros(sq, sk, dtype=torch.float64, device=q.device)
    if causal:
        bias = bias.masked_fill(~torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:
        bias = bias + mask.to(torch.float64)
    empty = torch.isneginf(bias).all(dim=-1)  # (Sq,) rows that see no key
    bias = bias.masked_fill(empty.unsqueeze(-1), 0.0)  # computed as if unmasked, then zeroed below
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale  # (B, H, Sq, Sk) in dt
    sf = s.to(torch.float64 if upcast else torch.float32) + bias.to(torch.float64 if upcast else torch.float32)
    lse = torch.logsumexp(sf, dim=-1)  # (B, H, Sq)
    p = torch.softmax(sf, dim=-1).to(dt)
    out = torch.matmul(p, vd) * (~empty).to(dt).unsqueeze(-1)
    lse = lse.masked_fill(empty, float("-inf"))
    return out, lse
