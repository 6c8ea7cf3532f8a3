"""TokenRing attention: forward and backward over a process group, and its autograd Function.

The ring loop only composes four pieces: the schedule (``schedule.py``, pure integers), the
communication (``comm.py``), the local block kernel (``kernels.py``) and the merge (``merge.py``).
See Note [TokenRing] in ``schedule.py`` for the picture.

Backward mirrors the forward. For the block (Q_o visiting rank r, K_r, V_r), with the FINAL lse_o
and delta_o = rowsum(dO_o * O_o)::

    P = exp(scale * Q_o K_r^T - lse_o);  dV_r += P^T dO_o;  dS = P * (dO_o V_r^T - delta_o)
    dK_r += scale * dS^T Q_o;            dQ_o += scale * dS K_r      <- partial, owned by o

so (q, dout, lse, delta) travel along the query path, the dq partials travel back along the result
path, and dK/dV accumulate where K/V live: K, V, dK and dV never move. Shipping delta (B, H, S)
rather than out (B, H, S, D) keeps the query-path message at 2 x q plus two scalars per row.

All tensors here are (B, H, S, D) (heads before sequence); lse and delta are (B, H, S).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..distributed.comm import P2P, Pending, nbytes, pack, unpack
from ..distributed.groups import RingGroups
from ..ops.kernels import BlockKernel
from ..ops.layout import local_chunks
from ..ops.merge import acc_dtype, empty_accumulator, merge_
from .tokenring_plan import Block, Rows, relay_schedule, tokenring_schedule

TOPOLOGIES = ("full", "ring")


@dataclass(frozen=True, slots=True)
class RingPlan:
    """Everything a pass needs besides the tensors."""

    causal: bool
    layout: str
    scale: float
    kernel: BlockKernel
    groups: RingGroups
    topology: str = "full"
    timeout: float | None = None


def _rows(x: torch.Tensor, rows: Rows, chunk: int, base: int = 0) -> torch.Tensor:
    """Sequence rows (chunk units, relative to ``base``) of x (B, H, S, ...)."""
    return x[:, :, (rows[0] - base) * chunk : (rows[1] - base) * chunk]


def _specs(like: list[torch.Tensor], tokens: int) -> list:
    return [((t.shape[0], t.shape[1], tokens, *t.shape[3:]), t.dtype) for t in like]


def _accumulate(acc: list[torch.Tensor], parts: list[torch.Tensor], dtype: torch.dtype, covers_all: bool,
                fresh: Callable[[], list[torch.Tensor]], fold: Callable[[], None]) -> None:
    """Fold a partial result into the accumulators ``acc``, created on first use: a first partial that
    covers every local row becomes them (in ``dtype``; no zero-fill and no fold), any other first
    partial starts from ``fresh()``. ``fold()`` folds ``parts`` into the filled ``acc``."""
    if not acc:
        if covers_all:
            acc.extend(p.to(dtype) for p in parts)
            return
        acc.extend(fresh())
    fold()


# ----------------------------------------------------------------------------------------------
# The direct pass: queries (or the backward's query bundle) one way, partials straight back.
# ----------------------------------------------------------------------------------------------

Compute = Callable[[Block, list[torch.Tensor]], list[torch.Tensor]]
Absorb = Callable[[Rows, list[torch.Tensor]], None]


def _direct_pass(
    plan: RingPlan, bundle: list[torch.Tensor], partial_like: list[torch.Tensor], compute: Compute, absorb: Absorb
) -> None:
    """Run the W steps of one rank.

    bundle: tensors (B, H, S, ...) of this rank's queries that travel (q; or q, dout, lse, delta).
    partial_like: tensors shaped like one partial result over all S rows (for receive sizes).
    compute(block, bundle rows) -> partial over block.q_rows; absorb(rows, partial) folds a partial
    result of this rank's own queries into its accumulators.
    """
    g = plan.groups
    chunk = bundle[0].shape[2] // local_chunks(plan.layout)
    dev = bundle[0].device
    qc = P2P(g.q, "q", plan.timeout) if g.world > 1 else None
    oc = P2P(g.out, "out", plan.timeout) if g.world > 1 else None
    held, held_rows = bundle, (0, local_chunks(plan.layout))
    out_pending: tuple[Pending, Rows | None] | None = None
    for st in tokenring_schedule(g.rank, g.world, plan.causal, plan.layout):
        q_pending = None
        if st.q_send is not None or st.q_recv is not None:
            sends = [(st.q_send.peer, pack([_rows(t, st.q_send.rows, chunk, held_rows[0]) for t in held]))] if st.q_send else []
            recv_n = nbytes(_specs(bundle, (st.q_recv.rows[1] - st.q_recv.rows[0]) * chunk)) if st.q_recv else 0
            recvs = [(st.q_recv.peer, recv_n)] if st.q_recv else []
            q_pending = qc.post(step=st.step, sends=sends, recvs=recvs, device=dev)
        partial = None
        if st.block is not None:
            partial = compute(st.block, [_rows(t, st.block.q_rows, chunk, held_rows[0]) for t in held])
            if st.step == 0:
                absorb(st.block.q_rows, partial)
        if out_pending is not None:
            _absorb_received(out_pending, partial_like, chunk, absorb)
            out_pending = None
        if st.out_send is not None or st.out_recv is not None:
            sends = [(st.out_send.peer, pack(partial))] if st.out_send else []
            recvs = []
            if st.out_recv:
                recvs = [(st.out_recv.peer, nbytes(_specs(partial_like, (st.out_recv.rows[1] - st.out_recv.rows[0]) * chunk)))]
            out_pending = (oc.post(step=st.step, sends=sends, recvs=recvs, device=dev), st.out_recv.rows if st.out_recv else None)
        if q_pending is not None:
            bufs = q_pending.wait()
            if st.q_recv is not None:
                held_rows = st.q_recv.rows
                held = unpack(bufs[0], _specs(bundle, (held_rows[1] - held_rows[0]) * chunk))
    if out_pending is not None:
        _absorb_received(out_pending, partial_like, chunk, absorb)


def _absorb_received(pending: tuple[Pending, Rows | None], partial_like, chunk: int, absorb: Absorb) -> None:
    p, rows = pending
    bufs = p.wait()
    if rows is not None:
        absorb(rows, unpack(bufs[0], _specs(partial_like, (rows[1] - rows[0]) * chunk)))


# ----------------------------------------------------------------------------------------------
# The relay pass (topology="ring"): two head groups travel opposite ways with their accumulators.
# ----------------------------------------------------------------------------------------------


def head_split(heads: int, kv_heads: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """[(q head range, kv head range)] for the directions (-1, +1) of the relay pass.

    Splits on a kv-group boundary so each half is itself a valid GQA problem; with one kv head the
    query heads split and both halves share it; with a single head there is one direction only.
    """
    g = heads // kv_heads
    if kv_heads >= 2:
        kh = kv_heads // 2
        return [((0, kh * g), (0, kh)), ((kh * g, heads), (kh, kv_heads))]
    if heads >= 2:
        return [((0, heads // 2), (0, 1)), ((heads // 2, heads), (0, 1))]
    return [((0, heads), (0, kv_heads))]


RelayCompute = Callable[[Block, list[torch.Tensor], int], None]


def _relay_pass(plan: RingPlan, bundles: list[list[torch.Tensor]], compute: RelayCompute) -> list[list[torch.Tensor]]:
    """bundles[d]: the tensors (B, h_d, S, ...) of direction d that travel, accumulators included.

    compute(block, bundle, d) updates the bundle's accumulators in place. Returns this rank's own
    bundles after the full round trip (their accumulators complete).

    Each direction waits for its bundle only just before computing on it, so each direction's
    transfer overlaps the other direction's compute::

        step s:     compute 0, post 0,  compute 1, post 1
        step s+1:   wait 0, compute 0, post 0,  wait 1, compute 1, post 1
                    (post 0 .. wait 0 spans compute 1; post 1 .. wait 1 spans the next compute 0)
    """
    g = plan.groups
    dev = bundles[0][0].device
    dirs = (-1, 1)[: len(bundles)]
    chans = [P2P(g.q, "q", plan.timeout), P2P(g.out, "out", plan.timeout)] if g.world > 1 else []
    scheds = [relay_schedule(g.rank, g.world, plan.causal, plan.layout, d) for d in dirs]
    specs = [[(tuple(t.shape), t.dtype) for t in b] for b in bundles]
    cur = list(bundles)
    pend: list[Pending | None] = [None] * len(dirs)
    for s in range(g.world):
        for d in range(len(dirs)):
            if pend[d] is not None:
                cur[d], pend[d] = unpack(pend[d].wait()[0], specs[d]), None
            st = scheds[d][s]
            if st.block is not None:
                compute(st.block, cur[d], d)
            if g.world > 1:
                pend[d] = chans[d].post(step=s, sends=[(st.send_to, pack(cur[d]))], recvs=[(st.recv_from, nbytes(specs[d]))], device=dev)
    for d, p in enumerate(pend):
        if p is not None:
            cur[d] = unpack(p.wait()[0], specs[d])
    return cur


# ----------------------------------------------------------------------------------------------
# Forward and backward.
# ----------------------------------------------------------------------------------------------


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, S, D), k/v (B, H_kv, S, D) local shards -> out (B, H, S, D) q.dtype, lse (B, H, S) fp32/fp64."""
    chunk = q.shape[2] // local_chunks(plan.layout)
    kern, scale = plan.kernel, plan.scale

    def kv(block: Block, heads: tuple[int, int] | None = None):
        kk, vv = _rows(k, block.k_rows, chunk), _rows(v, block.k_rows, chunk)
        if heads is not None:
            kk, vv = kk[:, heads[0] : heads[1]], vv[:, heads[0] : heads[1]]
        return kk, vv

    if plan.topology == "ring" and plan.groups.world > 1:
        split = head_split(q.shape[1], k.shape[1])
        bundles = []
        for (h0, h1), _ in split:
            acc_o, acc_l = empty_accumulator(q[:, h0:h1])
            bundles.append([q[:, h0:h1].contiguous(), acc_o, acc_l])

        def relay_compute(block: Block, bundle: list[torch.Tensor], d: int) -> None:
            qq, acc_o, acc_l = bundle
            kk, vv = kv(block, split[d][1])
            o, l = kern.forward(_rows(qq, block.q_rows, chunk), kk, vv, causal=block.diagonal, mask=None, scale=scale)
            merge_(_rows(acc_o, block.q_rows, chunk), _rows(acc_l, block.q_rows, chunk), o, l)

        done = _relay_pass(plan, bundles, relay_compute)
        out = torch.cat([b[1] for b in done], dim=1)
        lse = torch.cat([b[2] for b in done], dim=1)
        return out.to(q.dtype), lse

    adt = acc_dtype(q.dtype)
    n_rows = (0, local_chunks(plan.layout))
    acc: list[torch.Tensor] = []  # [out, lse], fp32/fp64

    def compute(block: Block, qb: list[torch.Tensor]) -> list[torch.Tensor]:
        kk, vv = kv(block)
        o, l = kern.forward(qb[0], kk, vv, causal=block.diagonal, mask=None, scale=scale)
        return [o, l.to(adt)]

    def absorb(rows: Rows, part: list[torch.Tensor]) -> None:
        _accumulate(acc, part, adt, rows == n_rows, lambda: list(empty_accumulator(q)),
                    lambda: merge_(_rows(acc[0], rows, chunk), _rows(acc[1], rows, chunk), part[0], part[1]))

    partial_like = [q, torch.empty(q.shape[:-1], dtype=adt, device="meta")]
    _direct_pass(plan, [q], partial_like, compute, absorb)
    if not acc:
        acc.extend(empty_accumulator(q))
    return acc[0].to(q.dtype), acc[1]


def ring_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, plan: RingPlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the local shards. dout/q/out (B, H, S, D), k/v (B, H_kv, S, D), lse (B, H, S)."""
    chunk = q.shape[2] // local_chunks(plan.layout)
    kern, scale = plan.kernel, plan.scale
    adt = acc_dtype(q.dtype)
    delta = (dout.to(adt) * out.to(adt)).sum(-1)  # (B, H, S)
    n_rows = (0, local_chunks(plan.layout))
    kv_grads: list[torch.Tensor] = []  # [dK, dV] accumulators

    def block_grads(block: Block, qq, do, ll, dd, heads: tuple[int, int] | None = None, out_rows=None):
        kk, vv = _rows(k, block.k_rows, chunk), _rows(v, block.k_rows, chunk)
        if heads is not None:
            kk, vv = kk[:, heads[0] : heads[1]], vv[:, heads[0] : heads[1]]
        dq, dk, dv = kern.backward(do, qq, kk, vv, ll, dd, causal=block.diagonal, mask=None, scale=scale, out=out_rows)

        def fold() -> None:
            dk_t, dv_t = _rows(kv_grads[0], block.k_rows, chunk), _rows(kv_grads[1], block.k_rows, chunk)
            if heads is not None:
                dk_t, dv_t = dk_t[:, heads[0] : heads[1]], dv_t[:, heads[0] : heads[1]]
            dk_t.add_(dk)
            dv_t.add_(dv)

        _accumulate(kv_grads, [dk, dv], adt, heads is None and block.k_rows == n_rows,
                    lambda: [torch.zeros(k.shape, dtype=adt, device=k.device), torch.zeros(v.shape, dtype=adt, device=v.device)], fold)
        return dq

    def kv_result() -> tuple[torch.Tensor, torch.Tensor]:
        if not kv_grads:
            return torch.zeros_like(k), torch.zeros_like(v)
        return kv_grads[0].to(k.dtype), kv_grads[1].to(v.dtype)

    if plan.topology == "ring" and plan.groups.world > 1:
        split = head_split(q.shape[1], k.shape[1])
        bundles = []
        for (h0, h1), _ in split:
            sl = slice(h0, h1)
            bundles.append([q[:, sl].contiguous(), dout[:, sl].contiguous(), lse[:, sl].contiguous(),
                            delta[:, sl].contiguous(), torch.zeros(q[:, sl].shape, dtype=adt, device=q.device)])

        def relay_compute(block: Block, bundle: list[torch.Tensor], d: int) -> None:
            qq, do, ll, dd, dq_acc = (_rows(t, block.q_rows, chunk) for t in bundle)
            dq_acc.add_(block_grads(block, qq, do, ll, dd, split[d][1]))

        done = _relay_pass(plan, bundles, relay_compute)
        dq = torch.cat([b[4] for b in done], dim=1)
        return (dq.to(q.dtype), *kv_result())

    dq_acc: list[torch.Tensor] = []

    def compute(block: Block, b: list[torch.Tensor]) -> list[torch.Tensor]:
        # this rank's own queries (the diagonal block): the real output is here, no surrogate needed
        own = _rows(out, block.q_rows, chunk) if block.diagonal else None
        return [block_grads(block, *b, out_rows=own)]

    def absorb(rows: Rows, part: list[torch.Tensor]) -> None:
        _accumulate(dq_acc, part, adt, rows == n_rows, lambda: [torch.zeros(q.shape, dtype=adt, device=q.device)],
                    lambda: _rows(dq_acc[0], rows, chunk).add_(part[0]))

    _direct_pass(plan, [q, dout, lse, delta], [q], compute, absorb)
    dq = dq_acc[0] if dq_acc else torch.zeros(q.shape, dtype=adt, device=q.device)
    return (dq.to(q.dtype), *kv_result())


class TokenRingAttention(torch.autograd.Function):
    """Autograd wrapper. Takes and returns the public (B, S, H, D) layout."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> torch.Tensor:
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, H, S, D)
        out, lse = ring_forward(qh, kh, vh, plan)
        ctx.save_for_backward(qh, kh, vh, out, lse)
        ctx.plan = plan
        return out.transpose(1, 2).contiguous()  # (B, S, H, D)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        qh, kh, vh, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.transpose(1, 2).contiguous(), qh, kh, vh, out, lse, ctx.plan)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None
