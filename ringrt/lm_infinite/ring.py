"""Λ-mask attention over contiguous shards: halo exchange, global-token relay, block-skipping compute.

The pass composes the plan (``plan.py``, pure integers), the communication (``comm.P2P``), the
block kernel (``kernels.py``) with the tiles of ``mask.py``, and the fp32 merge (``merge.py``).
See Note [Λ-mask halo] in ``plan.py``.

Inputs arrive already rotated (RoPE is applied by the caller with plain differentiable ops):
``qr``/``kr`` at their positions for the local branch, ``qs`` at min(limit_distance, i) and the
raw ``k`` for the global branch. Forward on rank r::

    post halo sends/receives (K rotated, V) ─┐     post global-relay receive from r - 1
    own local tiles (q x own k)              │     wait relay, forward [0, global_out) to r + 1
                                             │     global tiles (qs x raw global k)
    wait halo ──────────────────────────────-┘     halo tiles (q x halo k)

every partial merged into one fp32 (out, lse) accumulator: one softmax over both branches. With
``algorithm="tokenring"`` the halo step is replaced by: post my query rows to the predecessors whose
keys they need, serve the successors' rows against my keys and send their partial (out, lse) back,
merge the partials that come back to me.
Backward: each tile's exact gradient from the FINAL lse and delta = rowsum(dout * out); halo
dK/dV go back to their owners, global dK/dV run up the relay, summed on the way.

Every halo exchange (K/V; query rows; partials; their gradients) is ONE ``post`` per rank with all
its sends and receives (on NCCL one ``batch_isend_irecv``), posted when the data to send is ready.
A receive posted earlier, on its own, would complete only after a later send of its peer on the
same communicator; NCCL runs a communicator's operations in order, so each rank's sends would
queue behind its own receive and the ranks would finish one after another (O(W)). Exchanges in
flight at the same time use different groups: halo exchanges the q group, the global-token relay
the out group. The relay is a chain by design (rank t forwards what t - 1 sent it), alone on its
communicator, and overlaps the local tiles.

Tensors here are (B, H, S, D) (heads before sequence); lse and delta are (B, H, S).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed.comm import P2P, Pending, nbytes, pack, unpack
from ..distributed.groups import RingGroups
from ..ops.kernels import BlockKernel
from ..ops.merge import acc_dtype, empty_accumulator, merge_
from .mask import LambdaMask, Tile, global_bias, global_tiles, local_bias, local_tiles
from .plan import HaloPlan

HALO, HALO_GRAD, GLOBAL, GLOBAL_GRAD = "lambda_halo", "lambda_halo_grad", "lambda_global", "lambda_global_grad"
# algorithm="tokenring": query rows go down to the key owners, partials come back up (both on the q group,
# one exchange after the other)
HALO_Q, HALO_OUT, HALO_Q_GRAD, HALO_DQ = "lambda_q", "lambda_out", "lambda_q_grad", "lambda_dq"


@dataclass(frozen=True, slots=True)
class LambdaPlan:
    """Everything a Λ-mask pass needs besides the tensors."""

    mask: LambdaMask
    scale: float
    kernel: BlockKernel
    groups: RingGroups
    halo: HaloPlan
    block: int
    algorithm: str = "ring"  # "ring": halo K/V travel to the queries; "tokenring": queries travel, partials return
    timeout: float | None = None


def _seq(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of x (B, H, S, ...) along the sequence dim."""
    return x[:, :, a:b]


def _kv_specs(like: torch.Tensor, n: int, dtype) -> list:
    shape = (like.shape[0], like.shape[1], n, like.shape[3])
    return [(shape, dtype), (shape, dtype)]


def _rows_spec(like: torch.Tensor, n: int, dtype):
    return (like.shape[0], like.shape[1], n, like.shape[3]), dtype


def _partial_specs(q: torch.Tensor, n: int) -> list:
    """A partial result for n query rows: out (B, H, n, D) in q.dtype and lse (B, H, n) fp32/fp64."""
    return [_rows_spec(q, n, q.dtype), ((q.shape[0], q.shape[1], n), acc_dtype(q.dtype))]


class _Keys:
    """A contiguous key range [start, start + len) held as (k, v) tensors (B, H_kv, n, D)."""

    def __init__(self, start: int, k: torch.Tensor, v: torch.Tensor):
        self.start, self.k, self.v = start, k, v

    def rows(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _seq(self.k, a - self.start, b - self.start), _seq(self.v, a - self.start, b - self.start)


def _channels(plan: LambdaPlan, names: tuple[str, str]) -> tuple[P2P | None, P2P | None]:
    g = plan.groups
    if g.world == 1:
        return None, None
    return P2P(g.q, names[0], plan.timeout), P2P(g.out, names[1], plan.timeout)


def _bias(t: Tile, plan: LambdaPlan, is_global: bool, dtype, device) -> torch.Tensor | None:
    if t.dense:
        return None
    make = global_bias if is_global else local_bias
    return make(t.q0, t.q1, t.k0, t.k1, plan.mask.n_local, dtype, device)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


def lambda_forward(qr, qs, kr, kraw, v, plan: LambdaPlan):
    """qr/qs (B, H, S, D), kr/kraw/v (B, H_kv, S, D) local shards.

    Returns out (B, H, S, D) in q.dtype, lse (B, H, S) fp32/fp64, and the received (halo, global)
    key ranges, kept for the backward.
    """
    hp, kern, scale = plan.halo, plan.kernel, plan.scale
    q0, q1, dev, dt = hp.q0, hp.q1, qr.device, kr.dtype
    tokenring = plan.algorithm == "tokenring"
    halo_ch, glob_ch = _channels(plan, (HALO_Q if tokenring else HALO, GLOBAL))
    halo_pend = q_pend = None
    if tokenring and (hp.q_to or hp.q_from):
        q_pend = halo_ch.post(
            step=0,
            sends=[(r.peer, pack([_seq(qr, r.k0 - q0, r.k1 - q0)])) for r in hp.q_to],
            recvs=[(r.peer, nbytes([_rows_spec(qr, r.n, qr.dtype)])) for r in hp.q_from],
            device=dev,
        )
        part_ch = P2P(plan.groups.q, HALO_OUT, plan.timeout)
    if not tokenring and (hp.halo_from or hp.halo_to):
        halo_pend = halo_ch.post(
            step=0,
            sends=[(r.peer, pack([_seq(kr, r.k0 - q0, r.k1 - q0), _seq(v, r.k0 - q0, r.k1 - q0)])) for r in hp.halo_to],
            recvs=[(r.peer, nbytes(_kv_specs(kr, r.n, dt))) for r in hp.halo_from],
            device=dev,
        )
    glob_pend = glob_ch.post(step=0, recvs=[(hp.rank - 1, nbytes(_kv_specs(kr, hp.global_in, dt)))], device=dev) if hp.global_in else None

    acc_o, acc_l = empty_accumulator(qr)
    own = _Keys(q0, kr, v)

    def run(tiles: list[Tile], q: torch.Tensor, keys: _Keys, is_global: bool) -> None:
        for t in tiles:
            kk, vv = keys.rows(t.k0, t.k1)
            o, l = kern.forward(_seq(q, t.q0 - q0, t.q1 - q0), kk, vv, causal=False,
                                mask=_bias(t, plan, is_global, q.dtype, dev), scale=scale)
            merge_(_seq(acc_o, t.q0 - q0, t.q1 - q0), _seq(acc_l, t.q0 - q0, t.q1 - q0), o, l)

    # Rank 0 starts the relay at once; the others forward as soon as their copy arrives.
    fwd_pend: Pending | None = None
    if hp.global_out and not hp.global_in:
        fwd_pend = glob_ch.post(step=1, sends=[(hp.rank + 1, pack([_seq(kraw, 0, hp.global_out), _seq(v, 0, hp.global_out)]))])

    run(local_tiles(q0, q1, q0, q1, plan.mask.n_local, plan.block), qr, own, False)

    glob = _Keys(0, kraw[:, :, :0], v[:, :, :0])
    if hp.global_held:
        parts_k, parts_v = [], []
        if glob_pend is not None:
            gk, gv = unpack(glob_pend.wait()[0], _kv_specs(kr, hp.global_in, dt))
            parts_k.append(gk)
            parts_v.append(gv)
        if hp.global_held > hp.global_in:  # the rest are this rank's own leading rows
            parts_k.append(_seq(kraw, hp.global_in - q0, hp.global_held - q0))
            parts_v.append(_seq(v, hp.global_in - q0, hp.global_held - q0))
        glob = _Keys(0, torch.cat(parts_k, 2), torch.cat(parts_v, 2))
        if hp.global_out and hp.global_in:
            fwd_pend = glob_ch.post(step=1, sends=[(hp.rank + 1, pack(list(glob.rows(0, hp.global_out))))])
        run(global_tiles(q0, q1, hp.global_used, plan.mask, plan.block), qs, glob, True)

    halo = _Keys(q0, kr[:, :, :0], v[:, :, :0])
    if q_pend is not None:  # tokenring: serve the successors' queries, then merge what predecessors computed
        bufs = q_pend.wait()
        sends = []
        for buf, r in zip(bufs, hp.q_from):
            (vq,) = unpack(buf, [_rows_spec(qr, r.n, qr.dtype)])
            o, l = empty_accumulator(vq)
            for t in local_tiles(r.k0, r.k1, q0, q1, plan.mask.n_local, plan.block):
                kk, vv = own.rows(t.k0, t.k1)
                bo, bl = kern.forward(_seq(vq, t.q0 - r.k0, t.q1 - r.k0), kk, vv, causal=False,
                                      mask=_bias(t, plan, False, vq.dtype, dev), scale=scale)
                merge_(_seq(o, t.q0 - r.k0, t.q1 - r.k0), _seq(l, t.q0 - r.k0, t.q1 - r.k0), bo, bl)
            sends.append((r.peer, pack([o.to(qr.dtype), l])))
        # one exchange: my partials go back to the successors as theirs come back to me
        part_pend = part_ch.post(step=1, sends=sends, recvs=[(r.peer, nbytes(_partial_specs(qr, r.n))) for r in hp.q_to], device=dev)
        for buf, r in zip(part_pend.wait(), hp.q_to):
            o, l = unpack(buf, _partial_specs(qr, r.n))
            merge_(_seq(acc_o, r.k0 - q0, r.k1 - q0), _seq(acc_l, r.k0 - q0, r.k1 - q0), o, l)
    if halo_pend is not None:
        bufs = halo_pend.wait()
        if hp.halo_from:
            ks, vs = zip(*(unpack(b, _kv_specs(kr, r.n, dt)) for b, r in zip(bufs, hp.halo_from)))
            halo = _Keys(hp.halo_start, torch.cat(ks, 2), torch.cat(vs, 2))
            run(local_tiles(q0, q1, hp.halo_start, q0, plan.mask.n_local, plan.block), qr, halo, False)
    if fwd_pend is not None:
        fwd_pend.wait()
    return acc_o.to(qr.dtype), acc_l, halo, glob


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


def lambda_backward(dout, qr, qs, kr, kraw, v, out, lse, halo: _Keys, glob: _Keys, plan: LambdaPlan):
    """Gradients w.r.t. (qr, qs, kr, kraw, v) of the local shards; shapes as in :func:`lambda_forward`."""
    hp, kern, scale = plan.halo, plan.kernel, plan.scale
    q0, q1, dev, n_local = hp.q0, hp.q1, qr.device, plan.mask.n_local
    adt = acc_dtype(qr.dtype)
    tokenring = plan.algorithm == "tokenring"
    halo_ch, glob_ch = _channels(plan, (HALO_Q_GRAD if tokenring else HALO_GRAD, GLOBAL_GRAD))
    spec = lambda n: _kv_specs(kr, n, adt)  # noqa: E731  (gradients travel in the accumulation dtype)
    delta = (dout.to(adt) * out.to(adt)).sum(-1)  # (B, H, S)

    bundle_specs = lambda n: [_rows_spec(qr, n, qr.dtype), _rows_spec(qr, n, dout.dtype),  # noqa: E731
                              ((qr.shape[0], qr.shape[1], n), lse.dtype), ((qr.shape[0], qr.shape[1], n), adt)]
    back_pend = q_pend = dq_pend = None
    if tokenring and (hp.q_to or hp.q_from):  # my queries' bundle down to the key owners; theirs to me
        q_pend = halo_ch.post(
            step=0,
            sends=[(r.peer, pack([_seq(x, r.k0 - q0, r.k1 - q0) for x in (qr, dout, lse, delta)])) for r in hp.q_to],
            recvs=[(r.peer, nbytes(bundle_specs(r.n))) for r in hp.q_from],
            device=dev,
        )
        dq_ch = P2P(plan.groups.q, HALO_DQ, plan.timeout)
    up_pend = glob_ch.post(step=0, recvs=[(hp.rank + 1, nbytes(spec(hp.global_out)))], device=dev) if hp.global_out else None

    dqr = torch.zeros(qr.shape, dtype=adt, device=dev)
    dqs = torch.zeros(qs.shape, dtype=adt, device=dev)
    dkr = torch.zeros(kr.shape, dtype=adt, device=dev)
    dkraw = torch.zeros(kraw.shape, dtype=adt, device=dev)
    dv = torch.zeros(v.shape, dtype=adt, device=dev)
    dhalo = _Keys(halo.start, torch.zeros(halo.k.shape, dtype=adt, device=dev), torch.zeros(halo.v.shape, dtype=adt, device=dev))
    dglob = _Keys(0, torch.zeros(glob.k.shape, dtype=adt, device=dev), torch.zeros(glob.v.shape, dtype=adt, device=dev))
    own, down = _Keys(q0, kr, v), _Keys(q0, dkr, dv)

    def run(tiles: list[Tile], base: int, rows: tuple, dq, keys: _Keys, dkeys: _Keys, is_global: bool) -> None:
        """rows = (q, dout, lse, delta) of query rows starting at token ``base``."""
        q, do, ll, dd = rows
        for t in tiles:
            a, b = t.q0 - base, t.q1 - base
            kk, vv = keys.rows(t.k0, t.k1)
            g_q, g_k, g_v = kern.backward(_seq(do, a, b), _seq(q, a, b), kk, vv, _seq(ll, a, b), _seq(dd, a, b),
                                          causal=False, mask=_bias(t, plan, is_global, q.dtype, dev), scale=scale)
            _seq(dq, a, b).add_(g_q)
            dk_t, dv_t = dkeys.rows(t.k0, t.k1)
            dk_t.add_(g_k)
            dv_t.add_(g_v)

    mine = (qr, dout, lse, delta)
    run(local_tiles(q0, q1, q0, q1, n_local, plan.block), q0, mine, dqr, own, down, False)
    if not tokenring and hp.halo_from:
        run(local_tiles(q0, q1, hp.halo_start, q0, n_local, plan.block), q0, mine, dqr, halo, dhalo, False)
    if hp.global_used:
        run(global_tiles(q0, q1, hp.global_used, plan.mask, plan.block), q0, (qs, dout, lse, delta), dqs, glob, dglob, True)

    pending_sends = []
    if q_pend is not None:  # serve the successors' query rows: dK/dV stay here, dq partials go back
        sends = []
        for buf, r in zip(q_pend.wait(), hp.q_from):
            vis = unpack(buf, bundle_specs(r.n))
            dq_part = torch.zeros(vis[0].shape, dtype=adt, device=dev)
            run(local_tiles(r.k0, r.k1, q0, q1, n_local, plan.block), r.k0, vis, dq_part, own, down, False)
            sends.append((r.peer, pack([dq_part])))
        # one exchange: dq partials back to the successors, mine from the predecessors
        dq_pend = dq_ch.post(step=1, sends=sends, recvs=[(r.peer, nbytes([_rows_spec(qr, r.n, adt)])) for r in hp.q_to], device=dev)
    if not tokenring and (hp.halo_from or hp.halo_to):  # one exchange: halo dK/dV back to their owners, mine from the successors
        back_pend = halo_ch.post(
            step=1,
            sends=[(r.peer, pack(list(dhalo.rows(r.k0, r.k1)))) for r in hp.halo_from],
            recvs=[(r.peer, nbytes(spec(r.n))) for r in hp.halo_to],
            device=dev,
        )
    if up_pend is not None:  # gradients of [0, global_out) from everyone after me
        gk, gv = unpack(up_pend.wait()[0], spec(hp.global_out))
        dk_g, dv_g = dglob.rows(0, hp.global_out)
        dk_g.add_(gk)
        dv_g.add_(gv)
    if hp.global_in:
        pending_sends.append(glob_ch.post(step=1, sends=[(hp.rank - 1, pack(list(dglob.rows(0, hp.global_in))))]))
    if hp.global_held > max(hp.global_in, q0):  # my own rows among the global keys
        a, b = max(hp.global_in, q0), hp.global_held
        dk_g, dv_g = dglob.rows(a, b)
        _seq(dkraw, a - q0, b - q0).add_(dk_g)
        _seq(dv, a - q0, b - q0).add_(dv_g)
    if back_pend is not None:
        for buf, r in zip(back_pend.wait(), hp.halo_to):
            gk, gv = unpack(buf, spec(r.n))
            _seq(dkr, r.k0 - q0, r.k1 - q0).add_(gk)
            _seq(dv, r.k0 - q0, r.k1 - q0).add_(gv)
    if dq_pend is not None:
        for buf, r in zip(dq_pend.wait(), hp.q_to):
            _seq(dqr, r.k0 - q0, r.k1 - q0).add_(unpack(buf, [_rows_spec(qr, r.n, adt)])[0])
    for p in pending_sends:
        p.wait()
    return tuple(x.to(like.dtype) for x, like in ((dqr, qr), (dqs, qs), (dkr, kr), (dkraw, kraw), (dv, v)))


class LambdaRingAttention(torch.autograd.Function):
    """Autograd wrapper. Takes and returns the public (B, S, H, D) layout."""

    @staticmethod
    def forward(ctx, qr, qs, kr, kraw, v, plan: LambdaPlan) -> torch.Tensor:
        xs = [x.transpose(1, 2).contiguous() for x in (qr, qs, kr, kraw, v)]  # (B, H, S, D)
        out, lse, halo, glob = lambda_forward(*xs, plan)
        ctx.save_for_backward(*xs, out, lse, halo.k, halo.v, glob.k, glob.v)
        ctx.starts = (halo.start, glob.start)
        ctx.plan = plan
        return out.transpose(1, 2).contiguous()  # (B, S, H, D)

    @staticmethod
    def backward(ctx, dout):
        qr, qs, kr, kraw, v, out, lse, hk, hv, gk, gv = ctx.saved_tensors
        halo, glob = _Keys(ctx.starts[0], hk, hv), _Keys(ctx.starts[1], gk, gv)
        grads = lambda_backward(dout.transpose(1, 2).contiguous(), qr, qs, kr, kraw, v, out, lse, halo, glob, ctx.plan)
        return (*(g.transpose(1, 2) for g in grads), None)
