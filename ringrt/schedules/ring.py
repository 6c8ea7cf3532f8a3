"""KV-ring attention: K/V rotate round the ring, queries stay (the ring-flash-attention scheme).

Note [KV ring]
--------------
At step s (0..W-1) member r holds the K/V shard of member src = (r - s) mod W, computes its own
queries against it (the rectangles of :func:`blocks.chunk_blocks`, so zigzag-balanced under a
causal mask) and merges the partial into its fp32 accumulator, while the shard moves on to r + 1::

    step 0: K/V of r       step 1: K/V of r-1      ...      step W-1: K/V of r+1
    r --(K,V)--> r+1  (every step but the last; the transfer overlaps the step's compute)

Backward: dK/dV travel with K/V. At step s member r adds its block's dK/dV for src to the partial
dK/dV that arrived for src (what the members before it added) and passes the sum on to r + 1, one
step behind the K/V shard, so each dK/dV transfer overlaps the next step's compute. After W hops
the finished dK/dV of r's own shard come home. dQ never moves. Every member holds one visiting
shard, its gradient buffers and the ones in flight: memory stays O(local shard).

Bytes a member sends (= receives), element size e of the inputs, a of the fp32/fp64 accumulators:
forward (W-1)*2*S_l*H_kv*D*e; backward (W-1)*2*S_l*H_kv*D*e + W*2*S_l*H_kv*D*a.

K/V run on the ring's ``kv_group``, dK/dV on its ``grad_group`` (for ``algorithm="ring"`` the two
lanes of ``RingGroups``; for the hybrid its column rings). Tensors here are (B, H, S, D); lse and
delta (B, H, S).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed.comm import P2P, nbytes, pack, spec_of, unpack
from ..ops.kernels import BlockKernel
from ..ops.layout import rank_chunks
from ..ops.merge import acc_dtype, empty_accumulator, grad_delta
from .base import RingPlan, attend_blocks, grad_blocks, seq_first_pass
from .blocks import chunk_blocks


@dataclass(frozen=True, slots=True)
class KVRing:
    """One ring: ``chunks[m]`` are the global chunk ids member m holds (ascending, equal counts)."""

    kv_group: dist.ProcessGroup | None  # carries K/V
    # carries dK/dV: a second group, so the two never queue together (on NCCL, which ignores tags and
    # runs a communicator's operations in order, they must be two communicators; see ringrt.distributed.groups)
    grad_group: dist.ProcessGroup | None
    rank: int
    world: int
    chunks: tuple[tuple[int, ...], ...]
    causal: bool
    scale: float
    kernel: BlockKernel
    timeout: float | None = None
    dlse: torch.Tensor | None = None  # backward only: the gradient of lse (B, H, S_l), or None


def kv_ring_sources(rank: int, world: int) -> list[int]:
    """The member whose K/V shard ``rank`` holds at each step."""
    return [(rank - s) % world for s in range(world)]


def kv_ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: KVRing) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, S_l, D), k/v (B, H_kv, S_l, D) -> out (B, H, S_l, D) q.dtype, lse (B, H, S_l) fp32/fp64."""
    mine = ring.chunks[ring.rank]
    chunk = q.shape[2] // len(mine)
    acc = empty_accumulator(q)
    chan = P2P(ring.kv_group, "kv", ring.timeout) if ring.world > 1 else None
    nxt, prev = (ring.rank + 1) % ring.world, (ring.rank - 1) % ring.world
    specs = [spec_of(k), spec_of(v)]
    cur = [k, v]
    for s, src in enumerate(kv_ring_sources(ring.rank, ring.world)):
        pending = None
        if s < ring.world - 1:
            pending = chan.post(step=s, sends=[(nxt, pack(cur))], recvs=[(prev, nbytes(specs))], device=q.device)
        attend_blocks(acc, q, cur[0], cur[1], chunk_blocks(mine, ring.chunks[src], ring.causal),
                      kernel=ring.kernel, scale=ring.scale, chunk=chunk)
        if pending is not None:
            cur = unpack(pending.wait()[0], specs)
    return acc[0].to(q.dtype), acc[1]


def kv_ring_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, ring: KVRing
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the local shards; shapes as in :func:`kv_ring_forward`, lse (B, H, S_l)."""
    mine = ring.chunks[ring.rank]
    chunk = q.shape[2] // len(mine)
    adt = acc_dtype(q.dtype)
    delta = grad_delta(dout, out, adt, ring.dlse)  # (B, H, S_l)
    dq = torch.zeros(q.shape, dtype=adt, device=q.device)
    kv_chan = P2P(ring.kv_group, "kv", ring.timeout) if ring.world > 1 else None
    grad_chan = P2P(ring.grad_group, "dkv", ring.timeout) if ring.world > 1 else None
    nxt, prev = (ring.rank + 1) % ring.world, (ring.rank - 1) % ring.world
    kv_specs = [spec_of(k), spec_of(v)]
    grad_specs = [(tuple(k.shape), adt), (tuple(v.shape), adt)]
    cur = [k, v]
    grad_pending = None
    dk = dv = None
    for s, src in enumerate(kv_ring_sources(ring.rank, ring.world)):
        kv_pending = None
        if s < ring.world - 1:
            kv_pending = kv_chan.post(step=s, sends=[(nxt, pack(cur))], recvs=[(prev, nbytes(kv_specs))], device=q.device)
        dk = torch.zeros(k.shape, dtype=adt, device=k.device)  # this step's dK/dV of src's shard
        dv = torch.zeros(v.shape, dtype=adt, device=v.device)
        grad_blocks((dq, dk, dv), dout, q, cur[0], cur[1], lse, delta, chunk_blocks(mine, ring.chunks[src], ring.causal),
                    kernel=ring.kernel, scale=ring.scale, chunk=chunk)
        if grad_pending is not None:  # what the members before this one added for src
            got_k, got_v = unpack(grad_pending.wait()[0], grad_specs)
            dk.add_(got_k)
            dv.add_(got_v)
            grad_pending = None
        if ring.world > 1:
            grad_pending = grad_chan.post(step=s, sends=[(nxt, pack([dk, dv]))], recvs=[(prev, nbytes(grad_specs))], device=q.device)
        if kv_pending is not None:
            cur = unpack(kv_pending.wait()[0], kv_specs)
    if grad_pending is not None:  # the finished dK/dV of this member's own shard
        dk, dv = unpack(grad_pending.wait()[0], grad_specs)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _ring_of(plan: RingPlan) -> KVRing:
    g = plan.groups
    kv_group, grad_group = g.lanes
    return KVRing(
        kv_group=kv_group, grad_group=grad_group, rank=g.rank, world=g.world,
        chunks=tuple(tuple(rank_chunks(plan.layout, r, g.world)) for r in range(g.world)),
        causal=plan.causal, scale=plan.scale, kernel=plan.kernel, timeout=plan.timeout, dlse=plan.dlse,
    )


ring_pass = seq_first_pass(kv_ring_forward, kv_ring_backward, _ring_of)
"""``algorithm="ring"``: q (B, S_l, H, D), k/v (B, S_l, H_kv, D) shards in ``plan.layout`` -> (B, S_l, H, D)."""
