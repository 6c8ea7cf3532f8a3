"""Ulysses attention (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards and back.

Note [Ulysses]
--------------
Each of the u members holds S/u tokens of every head. One all-to-all per tensor gives each member
all S tokens of H/u heads; attention then needs no further communication; a second all-to-all
brings the output back to sequence shards::

    member i: (B, S/u, H, D) --all-to-all--> (B, S, H/u, D) --attention--> --all-to-all--> (B, S/u, H, D)

The gathered tokens arrive in member order (member 0's shard, member 1's, ...). For the zigzag
layout that is not global order, so the chunks are put in ascending global order as they are copied
out of the receive buffer: the kernel's top-left causal mask over the whole sequence is then exact.
q, k and v travel in one all-to-all (packed per destination), their gradients in one as well.

Heads: H and H_kv must both divide by u. With fewer K/V heads than members (H_kv < u) each K/V head
is replicated u / H_kv times before the all-to-all (u must then be a multiple of H_kv), so every
member receives the one K/V head its H/u query heads share; the replicas' gradients are summed.

Bytes a member sends (= receives), element size e, for S_l local tokens: forward
(u-1)/u * S_l * D * e * (2 H + 2 H_kv'), backward the same, where H_kv' = max(H_kv, u).
"""

from __future__ import annotations

import torch

from ..distributed.collectives import AllToAll, heads_to_seq, seq_to_heads
from ..ops.layout import rank_chunks
from ..ops.merge import grad_delta
from .base import RingPlan, heads_first


def ulysses_problem(heads: int, kv_heads: int, degree: int) -> str | None:
    """Why ``heads``/``kv_heads`` cannot be split over ``degree`` members, or None."""
    if heads % degree:
        return f"heads={heads} must be divisible by the Ulysses degree {degree}; valid degrees: {_divisors(heads)}"
    if kv_heads % degree and degree % kv_heads:
        return (
            f"kv_heads={kv_heads} must be divisible by the Ulysses degree {degree}, or divide it (K/V heads are then "
            f"replicated); valid degrees for heads={heads}, kv_heads={kv_heads}: "
            f"{[d for d in _divisors(heads) if kv_heads % d == 0 or d % kv_heads == 0]}"
        )
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def replicate_kv(x: torch.Tensor, degree: int) -> torch.Tensor:
    """(B, S, H_kv, D) -> (B, S, max(H_kv, degree), D): repeat each K/V head when H_kv < degree."""
    kvh = x.shape[2]
    return x if kvh >= degree else x.repeat_interleave(degree // kvh, dim=2)


def local_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-sequence attention of one member's heads with the block kernel: q (B, H, S, D), k/v
    (B, H_kv, S, D), tokens in ascending global order -> out (B, H, S, D), lse (B, H, S)."""
    return plan.kernel.forward(q, k, v, causal=plan.causal, mask=None, scale=plan.scale)


def local_backward(dout, q, k, v, out, lse, plan: RingPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`local_forward`'s inputs."""
    delta = grad_delta(dout, out, lse.dtype)  # (B, H, S)
    return plan.kernel.backward(dout, q, k, v, lse, delta, causal=plan.causal, mask=None, scale=plan.scale, out=out)


def to_heads(xs: list[torch.Tensor], group, member_chunks: list[list[int]], timeout) -> list[torch.Tensor]:
    """(B, S_l, H_t, D) shards -> (B, H_t/u, u*S_l, D) contiguous, the group's tokens in ascending global
    order; all tensors in one all-to-all. ``member_chunks[i]``: member i's global chunk ids. Without a
    group (u = 1) a rank's own chunks are already in ascending order."""
    if group is None:
        return [x.transpose(1, 2).contiguous() for x in xs]
    return list(AllToAll.apply(seq_to_heads, heads_to_seq, group, member_chunks, "a2a", timeout, *xs))


def from_heads(y: torch.Tensor, group, member_chunks: list[list[int]], timeout) -> torch.Tensor:
    """Inverse of :func:`to_heads` for one tensor: (B, H/u, u*S_l, D) -> (B, S_l, H, D) contiguous."""
    if group is None:
        return y.transpose(1, 2).contiguous()
    return AllToAll.apply(heads_to_seq, seq_to_heads, group, member_chunks, "a2a", timeout, y)[0]


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> torch.Tensor:
    """``algorithm="ulysses"``: q (B, S_l, H, D), k/v (B, S_l, H_kv, D) shards -> (B, S_l, H, D).

    Raises ValueError (identically on every rank, before any transfer) if the heads cannot be split.
    """
    g = plan.groups
    problem = ulysses_problem(q.shape[2], k.shape[2], g.world)
    if problem:
        raise ValueError(f"ringrt.attention(algorithm='ulysses'): {problem}")
    group = g.base if g.world > 1 else None
    members = [rank_chunks(plan.layout, r, g.world) for r in range(g.world)]
    qh, kh, vh = to_heads([q, replicate_kv(k, g.world), replicate_kv(v, g.world)], group, members, plan.timeout)
    out = heads_first(local_forward, local_backward, plan, qh, kh, vh)  # (B, H/u, u*S_l, D)
    return from_heads(out, group, members, plan.timeout)
