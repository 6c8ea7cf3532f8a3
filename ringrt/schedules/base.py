"""What every schedule shares: the plan of a call, the autograd Function, and the block loops.

A schedule is a pair of raw passes over heads-first tensors (B, H, S, D); lse and delta (B, H, S)::

    forward(*inputs, plan)                          -> (out, lse, *kept)
    backward(dout, *inputs, out, lse, *kept, plan)  -> (gradient of each input)

``kept`` are any further tensors the forward hands to the backward (the Λ-mask pass keeps the halo
and global K/V it received); the plain schedules keep none. :class:`ShardAttention` saves the
inputs, out, lse and ``kept`` and nothing else, so a schedule's memory between forward and backward
is exactly those tensors. :func:`seq_first` runs a pair on the public (B, S, H, D) layout: it
transposes the inputs into contiguous heads-first copies and the output back, in autograd.

Inside a pass, :func:`attend_blocks` and :func:`grad_blocks` are the block loops: one kernel call
per :class:`~.blocks.Block` on row slices, merged into fp32 (out, lse) accumulators (forward) or
added into dq/dk/dv (backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..distributed.groups import RingGroups
from ..ops.kernels import BlockKernel
from ..ops.merge import merge_
from .blocks import Block, rows

TOPOLOGIES = ("full", "ring")


@dataclass(frozen=True, slots=True)
class RingPlan:
    """Everything a ``ringrt.attention`` pass needs besides the tensors (every schedule takes it)."""

    causal: bool
    layout: str
    scale: float
    kernel: BlockKernel
    groups: RingGroups
    topology: str = "full"  # one of TOPOLOGIES: "ring" keeps every transfer between neighbours
    timeout: float | None = None


Forward = Callable[..., Sequence[torch.Tensor]]
Backward = Callable[..., Sequence[torch.Tensor]]


class ShardAttention(torch.autograd.Function):
    """Autograd over a schedule's raw passes (see the module note); tensors heads-first in and out."""

    @staticmethod
    def forward(ctx, forward: Forward, backward: Backward, plan, *inputs: torch.Tensor) -> torch.Tensor:
        out, lse, *kept = forward(*inputs, plan)
        ctx.save_for_backward(*inputs, out, lse, *kept)
        ctx.backward_pass, ctx.plan = backward, plan
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        grads = ctx.backward_pass(dout.contiguous(), *ctx.saved_tensors, ctx.plan)
        return (None, None, None, *grads)


def heads_first(forward: Forward, backward: Backward, plan, *inputs: torch.Tensor) -> torch.Tensor:
    """Differentiable ``forward`` on (B, H, S, D) inputs -> out (B, H, S, D)."""
    return ShardAttention.apply(forward, backward, plan, *inputs)


def seq_first(forward: Forward, backward: Backward, plan, *inputs: torch.Tensor) -> torch.Tensor:
    """Differentiable ``forward`` on (B, S, H, D) inputs -> out (B, S, H, D), both contiguous."""
    xs = [x.transpose(1, 2).contiguous() for x in inputs]  # (B, H, S, D)
    return ShardAttention.apply(forward, backward, plan, *xs).transpose(1, 2).contiguous()


def attend_blocks(
    acc: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: Iterable[Block],
    *, kernel: BlockKernel, scale: float, chunk: int = 1, mask: torch.Tensor | None = None,
) -> None:
    """Merge the attention of q's rows ``b.q_rows`` over k/v's rows ``b.k_rows``, for each block b,
    into ``acc`` = (out (B, H, S, D), lse (B, H, S)) fp32/fp64 accumulators of q's rows, in place.

    Rows are in units of ``chunk`` tokens; ``mask``: an additive bias for a single block."""
    for b in blocks:
        o, lse = kernel.forward(rows(q, b.q_rows, chunk), rows(k, b.k_rows, chunk), rows(v, b.k_rows, chunk),
                                causal=b.diagonal, mask=mask, scale=scale)
        merge_(rows(acc[0], b.q_rows, chunk), rows(acc[1], b.q_rows, chunk), o, lse)


def grad_blocks(
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, blocks: Iterable[Block],
    *, kernel: BlockKernel, scale: float, chunk: int = 1, mask: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> None:
    """Add each block's gradients into ``grads`` = (dq, dk, dv): rows ``b.q_rows`` of dq (shaped like
    q), rows ``b.k_rows`` of dk and dv (shaped like k and v), in place. dout, lse, delta (and ``out``,
    for kernels that want it) are rows of the queries, lse the final one. Units and ``mask`` as in
    :func:`attend_blocks`."""
    dq, dk, dv = grads
    for b in blocks:
        g_q, g_k, g_v = kernel.backward(
            rows(dout, b.q_rows, chunk), rows(q, b.q_rows, chunk), rows(k, b.k_rows, chunk), rows(v, b.k_rows, chunk),
            rows(lse, b.q_rows, chunk), rows(delta, b.q_rows, chunk), causal=b.diagonal, mask=mask, scale=scale,
            out=None if out is None else rows(out, b.q_rows, chunk),
        )
        rows(dq, b.q_rows, chunk).add_(g_q)
        rows(dk, b.k_rows, chunk).add_(g_k)
        rows(dv, b.k_rows, chunk).add_(g_v)
