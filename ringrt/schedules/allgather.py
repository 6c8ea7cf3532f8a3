"""All-gather attention (Llama-3's context parallelism): gather K/V once, attend locally.

Note [All-gather]
-----------------
Every rank gathers the whole K/V (one all_gather of its packed K and V shard), puts the chunks in
global order and computes its own queries against it: a causal query chunk c sees chunks < c in
full and chunk c through a top-left causal mask (:func:`blocks.chunk_blocks`), so with the zigzag
layout every rank does the same work. No step overlaps communication with compute: the gather is
issued once, up front; with GQA the K/V it moves are small (H_kv << H).

Backward gathers K/V again (nothing of size S is kept between forward and backward), computes dQ
locally and the full-length dK/dV partials of its queries, and a reduce-scatter sums each rank's
slice where it lives.

Bytes a rank sends (= receives), element size e, accumulator size a (fp32/fp64):
forward (W-1)*2*S_l*H_kv*D*e; backward (W-1)*2*S_l*H_kv*D*(e + a).
Memory: the gathered K/V, 2*S*H_kv*D elements (plus fp32 dK/dV of that size in backward).

Tensors here are (B, H, S, D).
"""

from __future__ import annotations

import torch

from ..distributed.collectives import all_gather, reduce_scatter
from ..ops.layout import assemble, num_chunks, rank_chunks, shard_of
from ..ops.merge import acc_dtype, empty_accumulator, grad_delta
from .base import RingPlan, attend_blocks, grad_blocks, seq_first_pass
from .blocks import Block, chunk_blocks


def _gather_kv(k, v, plan: RingPlan, step: str):
    g = plan.groups
    if g.world == 1:
        return k, v
    parts = all_gather([k, v], g.base, "allgather", plan.timeout, step)
    return (assemble([p[0] for p in parts], plan.layout, dim=2), assemble([p[1] for p in parts], plan.layout, dim=2))


def _blocks(plan: RingPlan) -> list[Block]:
    g = plan.groups
    return chunk_blocks(rank_chunks(plan.layout, g.rank, g.world), list(range(num_chunks(plan.layout, g.world))), plan.causal)


def allgather_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, S_l, D), k/v (B, H_kv, S_l, D) -> out (B, H, S_l, D), lse (B, H, S_l)."""
    chunk = q.shape[2] // len(rank_chunks(plan.layout, 0, plan.groups.world))
    kf, vf = _gather_kv(k, v, plan, "forward")  # (B, H_kv, S, D), global order
    acc = empty_accumulator(q)
    attend_blocks(acc, q, kf, vf, _blocks(plan), kernel=plan.kernel, scale=plan.scale, chunk=chunk)
    return acc[0].to(q.dtype), acc[1]


def allgather_backward(dout, q, k, v, out, lse, plan: RingPlan):
    """Gradients of the local shards (shapes as in :func:`allgather_forward`)."""
    g = plan.groups
    chunk = q.shape[2] // len(rank_chunks(plan.layout, 0, g.world))
    adt = acc_dtype(q.dtype)
    delta = grad_delta(dout, out, adt, plan.dlse)  # (B, H, S_l)
    kf, vf = _gather_kv(k, v, plan, "backward")
    dq = torch.zeros(q.shape, dtype=adt, device=q.device)
    dkf = torch.zeros(kf.shape, dtype=adt, device=q.device)
    dvf = torch.zeros(vf.shape, dtype=adt, device=q.device)
    grad_blocks((dq, dkf, dvf), dout, q, kf, vf, lse, delta, _blocks(plan), kernel=plan.kernel, scale=plan.scale,
                chunk=chunk, out=out)
    if g.world == 1:
        return dq.to(q.dtype), dkf.to(k.dtype), dvf.to(v.dtype)
    dkv = torch.stack([dkf, dvf])  # (2, B, H_kv, S, D): one reduce-scatter for both
    pieces = [shard_of(dkv, plan.layout, r, g.world, dim=3) for r in range(g.world)]
    mine = reduce_scatter(pieces, g.base, "allgather", plan.timeout, "backward")
    return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype)


allgather_pass = seq_first_pass(allgather_forward, allgather_backward)
"""``algorithm="allgather"``: q (B, S_l, H, D), k/v (B, S_l, H_kv, D) shards -> (B, S_l, H, D)."""
