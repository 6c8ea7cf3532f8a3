"""Merging partial attention results. Pure math.

Two partial results over disjoint key sets, (out_a, lse_a) and (out_b, lse_b), combine into the
result over the union::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b
        = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)          # the stable form used here
        = lerp(out_a, out_b, sigmoid(lse_b - lse_a))                 # one fused pass over out

A row that saw no key carries lse = -inf and out = 0. Two such rows merge to (0, -inf) rather than
NaN: the sigmoid of (-inf) - (-inf) is NaN and is replaced by 0 (the empty side has no weight).
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Merge a partial into an accumulator, in place.

    out: (B, H, S, D) accumulator in fp32/fp64, lse: (B, H, S) same dtype;
    block_out: (B, H, S, D) any float dtype, block_lse: (B, H, S).
    """
    w = torch.sigmoid(block_lse.to(lse.dtype) - lse).nan_to_num_(nan=0.0)  # (B, H, S)
    out.lerp_(block_out.to(out.dtype), w.unsqueeze(-1))
    torch.logaddexp(lse, block_lse.to(lse.dtype), out=lse)


def empty_accumulator(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) accumulators for queries q (B, H, S, D): out = 0, lse = -inf."""
    dt = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=dt, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=dt, device=q.device)
    return out, lse
