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

The head-sharded copies of q, k, v and of the output and lse are what the forward keeps for the
backward, which sends dout the same way and the three gradients back in one all-to-all.
:func:`head_sharded_pass` is this frame around any heads-first pair: the hybrid runs its KV-ring in it.

The lse is computed head-sharded: with ``return_lse`` it rides back with the output (4 bytes per head
and token more, 8 for fp64), and its gradient goes out with dout.

Bytes a member sends (= receives), element size e, for S_l local tokens: forward
(u-1)/u * S_l * D * e * (2 H + 2 H_kv'), backward the same, where H_kv' = max(H_kv, u).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..distributed.collectives import heads_to_seq, seq_to_heads
from ..ops.layout import rank_chunks
from ..ops.merge import acc_dtype, grad_delta
from .base import Backward, Forward, Pass, RingPlan, Spec, swapped


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


def fold_kv(dx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Inverse of :func:`replicate_kv` for gradients: (B, S, H', D) -> (B, S, kv_heads, D), replicas summed."""
    b, s, h, d = dx.shape
    return dx if h == kv_heads else dx.view(b, s, kv_heads, h // kv_heads, d).sum(3)


def local_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-sequence attention of one member's heads with the block kernel: q (B, H, S, D), k/v
    (B, H_kv, S, D), tokens in ascending global order -> out (B, H, S, D), lse (B, H, S)."""
    return plan.kernel.forward(q, k, v, causal=plan.causal, mask=None, scale=plan.scale)


def local_backward(dout, q, k, v, out, lse, plan: RingPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`local_forward`'s inputs (``plan.dlse``: the gradient of lse, or None)."""
    delta = grad_delta(dout, out, lse.dtype, plan.dlse)  # (B, H, S)
    return plan.kernel.backward(dout, q, k, v, lse, delta, causal=plan.causal, mask=None, scale=plan.scale, out=out)


@dataclass(frozen=True, slots=True)
class HeadShards:
    """How a head-sharded pass spreads a call: ``u`` members of ``group`` (None when u = 1) swap
    sequence shards for head shards; ``members[i]``: member i's global chunk ids; ``inner``: the plan
    of the heads-first pair run in between."""

    group: object
    members: list
    u: int
    inner: object
    timeout: float | None = None


def to_heads(xs: list[torch.Tensor], sh: HeadShards, step: str) -> list[torch.Tensor]:
    """(B, S_l, H_t, D) shards -> (B, H_t/u, u*S_l, D) contiguous, the group's tokens in ascending
    global order; all tensors in one all-to-all. Without a group (u = 1) a rank's own chunks are
    already in ascending order."""
    if sh.group is None:
        return [swapped(x) for x in xs]
    return seq_to_heads(xs, sh.group, sh.members, "a2a", sh.timeout, step=step)


def from_heads(ys: list[torch.Tensor], sh: HeadShards, step: str) -> list[torch.Tensor]:
    """Inverse of :func:`to_heads`: (B, H_t/u, u*S_l, D) -> (B, S_l, H_t, D) contiguous."""
    if sh.group is None:
        return [swapped(y) for y in ys]
    return heads_to_seq(ys, sh.group, sh.members, "a2a", sh.timeout, step=step)


def head_sharded_pass(shards: Callable[[torch.Tensor, torch.Tensor, RingPlan], HeadShards], forward: Forward,
                      backward: Backward, degree: Callable[[torch.Tensor, torch.Tensor, int], int]) -> Pass:
    """A :class:`Pass` that runs the heads-first pair (``forward``, ``backward``) between the two
    all-to-alls of Note [Ulysses]. ``shards(q, k, plan)`` says how; ``degree(q, k, world)`` is its u.
    Kept: the head-sharded q, k, v, out and lse."""

    def sharded_forward(q, k, v, plan):
        sh = shards(q, k, plan)
        qh, kh, vh = to_heads([q, replicate_kv(k, sh.u), replicate_kv(v, sh.u)], sh, "forward (seq_to_heads)")
        out_h, lse_h = forward(qh, kh, vh, sh.inner)  # (B, H/u, u*S_l, D), (B, H/u, u*S_l)
        if not plan.return_lse:
            return from_heads([out_h], sh, "forward (heads_to_seq)")[0], None, [qh, kh, vh, out_h, lse_h]
        out, lse = from_heads([out_h, lse_h.unsqueeze(-1)], sh, "forward (heads_to_seq)")  # lse (B, S_l, H, 1)
        return out, lse.squeeze(-1).transpose(1, 2).contiguous(), [qh, kh, vh, out_h, lse_h]

    def sharded_backward(dout, q, k, v, out, lse, kept, plan):
        sh = shards(q, k, plan)
        qh, kh, vh, out_h, lse_h = kept
        sends = [dout] if plan.dlse is None else [dout, plan.dlse.transpose(1, 2).unsqueeze(-1)]  # dlse (B, S_l, H, 1)
        got = to_heads(sends, sh, "backward (seq_to_heads)")
        inner = sh.inner if plan.dlse is None else replace(sh.inner, dlse=got[1].squeeze(-1))
        grads = backward(got[0], qh, kh, vh, out_h, lse_h, inner)
        dq, dk, dv = from_heads(list(grads), sh, "backward (heads_to_seq)")
        return dq, fold_kv(dk, k.shape[2]), fold_kv(dv, v.shape[2])

    def kept(q, k, rank, world, options) -> list[Spec]:
        (b, s, h, d), kvh, u = q.shape, k.shape[2], degree(q, k, world)
        qs, kvs = (b, h // u, u * s, d), (b, max(kvh, u) // u, u * s, d)
        return [(qs, q.dtype), (kvs, k.dtype), (kvs, k.dtype), (qs, q.dtype), (qs[:3], acc_dtype(q.dtype))]

    return Pass(sharded_forward, sharded_backward, kept)


def _shards(q: torch.Tensor, k: torch.Tensor, plan: RingPlan) -> HeadShards:
    """Ulysses over the whole group. Raises ValueError (identically on every rank, before any
    transfer) if the heads cannot be split."""
    g = plan.groups
    problem = ulysses_problem(q.shape[2], k.shape[2], g.world)
    if problem:
        raise ValueError(f"ringrt.attention(algorithm='ulysses'): {problem}")
    members = [rank_chunks(plan.layout, r, g.world) for r in range(g.world)]
    return HeadShards(g.base if g.world > 1 else None, members, g.world, plan, plan.timeout)


ulysses_pass = head_sharded_pass(_shards, local_forward, local_backward, lambda q, k, world: world)
"""``algorithm="ulysses"``: q (B, S_l, H, D), k/v (B, S_l, H_kv, D) shards -> (B, S_l, H, D)."""
