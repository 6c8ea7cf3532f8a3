"""Merging partial attention results. Pure math.

Two partial results over disjoint key sets, (out_a, lse_a) and (out_b, lse_b), combine into the
result over the union::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b
        = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)          # the stable form used here
        = lerp(out_a, out_b, sigmoid(lse_b - lse_a))                 # one fused pass over out

A row that saw no key carries lse = -inf and out = 0. Two such rows merge to (0, -inf) rather than
NaN: the sigmoid of (-inf) - (-inf) would be NaN, so the accumulator's lse is clamped to the lowest
finite value first (an empty accumulator loses to anything, an empty block included). That is the
only case made finite. NaN propagates (the kernels' rule, ``kernels.py``): a row whose out or lse is
NaN on either side merges to a NaN row (NaN weight, or ``lerp``'s ``w * (b - a)`` with a NaN
operand), so a query row that saw a NaN in any block ends NaN, and every other row is untouched.

The backward of every schedule needs one more row statistic of the merged result,
delta = rowsum(dout * out) (:func:`grad_delta`): with the final lse it makes each block's gradient
exact on its own (``kernels.py``). When the lse itself is an output with a gradient dlse, that enters
here too: d lse_i / d s_ij = p_ij, so dS = P * (dP - delta + dlse), i.e. delta - dlse in place of delta.
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
    block_lse = block_lse.to(lse.dtype)
    # clamp_min keeps NaN and maps only lse = -inf to a finite floor: (-inf, -inf) -> w = 0, no host sync
    w = torch.sub(block_lse, lse.clamp_min(torch.finfo(lse.dtype).min)).sigmoid_()  # (B, H, S)
    out.lerp_(block_out.to(out.dtype), w.unsqueeze(-1))
    torch.logaddexp(lse, block_lse, out=lse)


def empty_accumulator(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) accumulators for queries q (B, H, S, D): out = 0, lse = -inf."""
    dt = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=dt, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=dt, device=q.device)
    return out, lse


def grad_delta(dout: torch.Tensor, out: torch.Tensor, dtype: torch.dtype | None = None,
               dlse: torch.Tensor | None = None) -> torch.Tensor:
    """delta = rowsum(dout * out) - dlse: dout, out (B, H, S, D), dlse (B, H, S) or None (the lse gets
    no gradient) -> (B, H, S) in ``dtype`` (default the accumulation dtype of ``out``), every factor
    cast to it first. With a dlse no output need reproduce this delta: the kernels then take it as
    given (:class:`ringrt.ops.lse_grad.LseGradKernel`)."""
    dt = dtype if dtype is not None else acc_dtype(out.dtype)
    delta = (dout.to(dt) * out.to(dt)).sum(-1)
    return delta if dlse is None else delta - dlse.to(dt)
