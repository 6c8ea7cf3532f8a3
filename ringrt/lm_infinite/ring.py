"""Λ-mask attention over contiguous shards: halo exchange, global-token relay, block-skipping compute.

The pass composes the plan (``plan.py``, pure integers), the communication (``comm.P2P``), the
block kernel with the tiles of ``mask.py``, and the fp32 merge, through the block loops every
schedule shares (``ringrt.schedules.base``). See Note [Λ-mask halo] in ``plan.py``.

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
flight at the same time use different groups: halo exchanges the first lane of ``RingGroups``, the
global-token relay the second. The relay is a chain by design (rank t forwards what t - 1 sent it),
alone on its communicator, and overlaps the local tiles.

Tensors here are (B, H, S, D) (heads before sequence); lse and delta are (B, H, S). Rows are token
indices of the whole sequence, sliced out of a local tensor with ``rows(x, (a, b), base=start)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed.comm import P2P, Pending, nbytes, pack, unpack
from ..distributed.groups import RingGroups
from ..ops.kernels import BlockKernel
from ..ops.merge import acc_dtype, empty_accumulator, grad_delta, merge_
from ..schedules.base import attend_blocks, grad_blocks
from ..schedules.blocks import Block, rows
from .mask import LambdaMask, Tile, global_bias, global_tiles, local_bias, local_tiles
from .plan import HaloPlan

HALO, HALO_GRAD, GLOBAL, GLOBAL_GRAD = "lambda_halo", "lambda_halo_grad", "lambda_global", "lambda_global_grad"
# algorithm="tokenring": query rows go down to the key owners, partials come back up (both on the first
# lane, one exchange after the other)
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
        return rows(self.k, (a, b), base=self.start), rows(self.v, (a, b), base=self.start)


def _channels(plan: LambdaPlan, names: tuple[str, str]) -> tuple[P2P | None, P2P | None]:
    g = plan.groups
    if g.world == 1:
        return None, None
    return P2P(g.lanes[0], names[0], plan.timeout), P2P(g.lanes[1], names[1], plan.timeout)


def _bias(t: Tile, plan: LambdaPlan, is_global: bool, dtype, device) -> torch.Tensor | None:
    if t.dense:
        return None
    make = global_bias if is_global else local_bias
    return make(t.q0, t.q1, t.k0, t.k1, plan.mask.n_local, dtype, device)


def _block(t: Tile, q_start: int, keys: _Keys) -> Block:
    """The tile as rows of the local query tensor (token ``q_start`` first) and of ``keys``."""
    return Block((t.q0 - q_start, t.q1 - q_start), (t.k0 - keys.start, t.k1 - keys.start), diagonal=False)


def _attend_tiles(acc, q: torch.Tensor, q_start: int, keys: _Keys, tiles: list[Tile], plan: LambdaPlan, is_global: bool) -> None:
    """Merge each tile of q (its first row is token ``q_start``) x ``keys`` into acc = (out, lse)."""
    for t in tiles:
        attend_blocks(acc, q, keys.k, keys.v, [_block(t, q_start, keys)], kernel=plan.kernel, scale=plan.scale,
                      mask=_bias(t, plan, is_global, q.dtype, q.device))


def _grad_tiles(dq, bundle, q_start: int, keys: _Keys, dkeys: _Keys, tiles: list[Tile], plan: LambdaPlan, is_global: bool) -> None:
    """Add each tile's gradients into dq (rows of the bundle's queries) and ``dkeys`` (the range of
    ``keys``); bundle = (q, dout, lse, delta) of query rows starting at token ``q_start``."""
    q, do, ll, dd = bundle
    for t in tiles:
        grad_blocks((dq, dkeys.k, dkeys.v), do, q, keys.k, keys.v, ll, dd, [_block(t, q_start, keys)],
                    kernel=plan.kernel, scale=plan.scale, mask=_bias(t, plan, is_global, q.dtype, q.device))


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


def lambda_forward(qr, qs, kr, kraw, v, plan: LambdaPlan):
    """qr/qs (B, H, S, D), kr/kraw/v (B, H_kv, S, D) local shards.

    Returns out (B, H, S, D) in q.dtype, lse (B, H, S) fp32/fp64, and the received halo and global
    keys and values (k, v of each, (B, H_kv, n, D)), kept for the backward.
    """
    hp = plan.halo
    q0, q1 = hp.q0, hp.q1
    tokenring = plan.algorithm == "tokenring"
    halo_ch, glob_ch = _channels(plan, (HALO_Q if tokenring else HALO, GLOBAL))
    q_pend = _post_queries(plan, qr, halo_ch) if tokenring else None
    halo_pend = None if tokenring else _post_halo(plan, kr, v, halo_ch)
    glob_pend = None
    if hp.global_in:
        glob_pend = glob_ch.post(step=0, recvs=[(hp.rank - 1, nbytes(_kv_specs(kr, hp.global_in, kr.dtype)))], device=qr.device)

    acc = empty_accumulator(qr)
    own = _Keys(q0, kr, v)
    # Rank 0 starts the relay at once; the others forward as soon as their copy arrives.
    fwd_pend: Pending | None = None
    if hp.global_out and not hp.global_in:
        fwd_pend = glob_ch.post(step=1, sends=[(hp.rank + 1, pack([rows(kraw, (0, hp.global_out)), rows(v, (0, hp.global_out))]))])

    _attend_tiles(acc, qr, q0, own, local_tiles(q0, q1, q0, q1, plan.mask.n_local, plan.block), plan, False)

    glob = _Keys(0, kraw[:, :, :0], v[:, :, :0])
    if hp.global_held:
        glob = _global_keys(plan, kr, kraw, v, glob_pend)
        if hp.global_out and hp.global_in:
            fwd_pend = glob_ch.post(step=1, sends=[(hp.rank + 1, pack(list(glob.rows(0, hp.global_out))))])
        _attend_tiles(acc, qs, q0, glob, global_tiles(q0, q1, hp.global_used, plan.mask, plan.block), plan, True)

    if q_pend is not None:  # tokenring: serve the successors' queries, then merge what predecessors computed
        _serve_queries(plan, qr, own, acc, q_pend)
    halo = _Keys(q0, kr[:, :, :0], v[:, :, :0])
    if halo_pend is not None:
        halo = _attend_halo(plan, qr, kr, acc, halo_pend, halo)
    if fwd_pend is not None:
        fwd_pend.wait()
    return acc[0].to(qr.dtype), acc[1], halo.k, halo.v, glob.k, glob.v


def _post_queries(plan: LambdaPlan, qr, halo_ch: P2P | None) -> Pending | None:
    """tokenring: my query rows down to the predecessors whose keys they need; theirs to me."""
    hp = plan.halo
    if not (hp.q_to or hp.q_from):
        return None
    return halo_ch.post(
        step=0,
        sends=[(r.peer, pack([rows(qr, (r.k0, r.k1), base=hp.q0)])) for r in hp.q_to],
        recvs=[(r.peer, nbytes([_rows_spec(qr, r.n, qr.dtype)])) for r in hp.q_from],
        device=qr.device,
    )


def _post_halo(plan: LambdaPlan, kr, v, halo_ch: P2P | None) -> Pending | None:
    """ring: my K/V rows to the successors whose window reaches them; my predecessors' to me."""
    hp = plan.halo
    if not (hp.halo_from or hp.halo_to):
        return None
    return halo_ch.post(
        step=0,
        sends=[(r.peer, pack([rows(kr, (r.k0, r.k1), base=hp.q0), rows(v, (r.k0, r.k1), base=hp.q0)])) for r in hp.halo_to],
        recvs=[(r.peer, nbytes(_kv_specs(kr, r.n, kr.dtype))) for r in hp.halo_from],
        device=kr.device,
    )


def _global_keys(plan: LambdaPlan, kr, kraw, v, glob_pend: Pending | None) -> _Keys:
    """Keys [0, global_held): what the relay brought, then this rank's own leading rows."""
    hp = plan.halo
    parts_k, parts_v = [], []
    if glob_pend is not None:
        gk, gv = unpack(glob_pend.wait()[0], _kv_specs(kr, hp.global_in, kr.dtype))
        parts_k.append(gk)
        parts_v.append(gv)
    if hp.global_held > hp.global_in:  # the rest are this rank's own leading rows
        parts_k.append(rows(kraw, (hp.global_in, hp.global_held), base=hp.q0))
        parts_v.append(rows(v, (hp.global_in, hp.global_held), base=hp.q0))
    return _Keys(0, torch.cat(parts_k, 2), torch.cat(parts_v, 2))


def _serve_queries(plan: LambdaPlan, qr, own: _Keys, acc, q_pend: Pending) -> None:
    """tokenring: the successors' query rows against my keys, their partials back in one exchange
    with mine coming back from the predecessors, merged into acc."""
    hp = plan.halo
    sends = []
    for buf, r in zip(q_pend.wait(), hp.q_from, strict=True):
        (vq,) = unpack(buf, [_rows_spec(qr, r.n, qr.dtype)])
        part = empty_accumulator(vq)
        _attend_tiles(part, vq, r.k0, own, local_tiles(r.k0, r.k1, hp.q0, hp.q1, plan.mask.n_local, plan.block), plan, False)
        sends.append((r.peer, pack([part[0].to(qr.dtype), part[1]])))
    part_ch = P2P(plan.groups.lanes[0], HALO_OUT, plan.timeout)
    part_pend = part_ch.post(step=1, sends=sends, recvs=[(r.peer, nbytes(_partial_specs(qr, r.n))) for r in hp.q_to], device=qr.device)
    for buf, r in zip(part_pend.wait(), hp.q_to, strict=True):
        o, lse = unpack(buf, _partial_specs(qr, r.n))
        merge_(rows(acc[0], (r.k0, r.k1), base=hp.q0), rows(acc[1], (r.k0, r.k1), base=hp.q0), o, lse)


def _attend_halo(plan: LambdaPlan, qr, kr, acc, halo_pend: Pending, empty: _Keys) -> _Keys:
    """ring: wait for the halo K/V and merge the halo tiles into acc; returns the halo keys."""
    hp = plan.halo
    bufs = halo_pend.wait()
    if not hp.halo_from:
        return empty
    ks, vs = zip(*(unpack(b, _kv_specs(kr, r.n, kr.dtype)) for b, r in zip(bufs, hp.halo_from, strict=True)), strict=True)
    halo = _Keys(hp.halo_start, torch.cat(ks, 2), torch.cat(vs, 2))
    _attend_tiles(acc, qr, hp.q0, halo, local_tiles(hp.q0, hp.q1, hp.halo_start, hp.q0, plan.mask.n_local, plan.block), plan, False)
    return halo


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


def lambda_backward(dout, qr, qs, kr, kraw, v, out, lse, halo_k, halo_v, glob_k, glob_v, plan: LambdaPlan):
    """Gradients w.r.t. (qr, qs, kr, kraw, v) of the local shards; shapes as in :func:`lambda_forward`,
    whose kept halo and global keys and values come after lse."""
    hp = plan.halo
    q0, q1, dev, n_local = hp.q0, hp.q1, qr.device, plan.mask.n_local
    adt = acc_dtype(qr.dtype)
    tokenring = plan.algorithm == "tokenring"
    halo_ch, glob_ch = _channels(plan, (HALO_Q_GRAD if tokenring else HALO_GRAD, GLOBAL_GRAD))
    delta = grad_delta(dout, out, adt)  # (B, H, S)
    mine = (qr, dout, lse, delta)
    q_pend = _post_query_bundle(plan, mine, halo_ch) if tokenring else None
    up_pend = None
    if hp.global_out:
        up_pend = glob_ch.post(step=0, recvs=[(hp.rank + 1, nbytes(_kv_specs(kr, hp.global_out, adt)))], device=dev)

    dqr, dqs, dkr, dkraw, dv = (torch.zeros(x.shape, dtype=adt, device=dev) for x in (qr, qs, kr, kraw, v))
    halo, glob = _Keys(hp.halo_start, halo_k, halo_v), _Keys(0, glob_k, glob_v)
    dhalo, dglob = (_Keys(keys.start, torch.zeros(keys.k.shape, dtype=adt, device=dev), torch.zeros(keys.v.shape, dtype=adt, device=dev))
                    for keys in (halo, glob))
    own, down = _Keys(q0, kr, v), _Keys(q0, dkr, dv)

    _grad_tiles(dqr, mine, q0, own, down, local_tiles(q0, q1, q0, q1, n_local, plan.block), plan, False)
    if not tokenring and hp.halo_from:
        _grad_tiles(dqr, mine, q0, halo, dhalo, local_tiles(q0, q1, hp.halo_start, q0, n_local, plan.block), plan, False)
    if hp.global_used:
        _grad_tiles(dqs, (qs, dout, lse, delta), q0, glob, dglob, global_tiles(q0, q1, hp.global_used, plan.mask, plan.block),
                    plan, True)

    dq_pend = _serve_query_grads(plan, mine, own, down, q_pend) if q_pend is not None else None
    back_pend = None if tokenring else _post_halo_grads(plan, kr, dhalo, halo_ch)
    relay_pend = _relay_global_grads(plan, kr, dkraw, dv, dglob, up_pend, glob_ch)
    if back_pend is not None:  # halo dK/dV of my rows, from the successors
        for buf, r in zip(back_pend.wait(), hp.halo_to, strict=True):
            gk, gv = unpack(buf, _kv_specs(kr, r.n, adt))
            rows(dkr, (r.k0, r.k1), base=q0).add_(gk)
            rows(dv, (r.k0, r.k1), base=q0).add_(gv)
    if dq_pend is not None:  # dq partials of my rows, from the predecessors
        for buf, r in zip(dq_pend.wait(), hp.q_to, strict=True):
            rows(dqr, (r.k0, r.k1), base=q0).add_(unpack(buf, [_rows_spec(qr, r.n, adt)])[0])
    if relay_pend is not None:
        relay_pend.wait()
    return tuple(x.to(like.dtype) for x, like in ((dqr, qr), (dqs, qs), (dkr, kr), (dkraw, kraw), (dv, v)))


def _bundle_specs(qr, n: int, bundle) -> list:
    """Specs of n rows of the query bundle (q, dout, lse, delta)."""
    _, dout, lse, delta = bundle
    b, h = qr.shape[0], qr.shape[1]
    return [_rows_spec(qr, n, qr.dtype), _rows_spec(qr, n, dout.dtype), ((b, h, n), lse.dtype), ((b, h, n), delta.dtype)]


def _post_query_bundle(plan: LambdaPlan, bundle, halo_ch: P2P | None) -> Pending | None:
    """tokenring: my queries' bundle (q, dout, lse, delta) down to the key owners; theirs to me."""
    hp = plan.halo
    if not (hp.q_to or hp.q_from):
        return None
    qr = bundle[0]
    return halo_ch.post(
        step=0,
        sends=[(r.peer, pack([rows(x, (r.k0, r.k1), base=hp.q0) for x in bundle])) for r in hp.q_to],
        recvs=[(r.peer, nbytes(_bundle_specs(qr, r.n, bundle))) for r in hp.q_from],
        device=qr.device,
    )


def _serve_query_grads(plan: LambdaPlan, bundle, own: _Keys, down: _Keys, q_pend: Pending) -> Pending:
    """tokenring: the successors' query rows against my keys (dK/dV stay here, in ``down``), their dq
    partials back in one exchange with mine coming back from the predecessors. ``bundle``: mine."""
    hp, qr = plan.halo, bundle[0]
    adt = down.k.dtype
    sends = []
    for buf, r in zip(q_pend.wait(), hp.q_from, strict=True):
        vis = unpack(buf, _bundle_specs(qr, r.n, bundle))
        dq_part = torch.zeros(vis[0].shape, dtype=adt, device=qr.device)
        _grad_tiles(dq_part, vis, r.k0, own, down, local_tiles(r.k0, r.k1, hp.q0, hp.q1, plan.mask.n_local, plan.block), plan, False)
        sends.append((r.peer, pack([dq_part])))
    dq_ch = P2P(plan.groups.lanes[0], HALO_DQ, plan.timeout)
    return dq_ch.post(step=1, sends=sends, recvs=[(r.peer, nbytes([_rows_spec(qr, r.n, adt)])) for r in hp.q_to], device=qr.device)


def _post_halo_grads(plan: LambdaPlan, kr, dhalo: _Keys, halo_ch: P2P | None) -> Pending | None:
    """ring: one exchange: halo dK/dV back to their owners, mine from the successors."""
    hp = plan.halo
    if not (hp.halo_from or hp.halo_to):
        return None
    return halo_ch.post(
        step=1,
        sends=[(r.peer, pack(list(dhalo.rows(r.k0, r.k1)))) for r in hp.halo_from],
        recvs=[(r.peer, nbytes(_kv_specs(kr, r.n, dhalo.k.dtype))) for r in hp.halo_to],
        device=kr.device,
    )


def _relay_global_grads(plan: LambdaPlan, kr, dkraw, dv, dglob: _Keys, up_pend: Pending | None, glob_ch: P2P | None) -> Pending | None:
    """Global-key gradients: add what every rank after me sent for [0, global_out), pass [0, global_in)
    on to rank - 1 (the pending send is returned), and fold my own rows among the global keys into
    dkraw and dv."""
    hp = plan.halo
    if up_pend is not None:
        gk, gv = unpack(up_pend.wait()[0], _kv_specs(kr, hp.global_out, dglob.k.dtype))
        dk_g, dv_g = dglob.rows(0, hp.global_out)
        dk_g.add_(gk)
        dv_g.add_(gv)
    sent = None
    if hp.global_in:
        sent = glob_ch.post(step=1, sends=[(hp.rank - 1, pack(list(dglob.rows(0, hp.global_in))))])
    if hp.global_held > max(hp.global_in, hp.q0):  # my own rows among the global keys
        a, b = max(hp.global_in, hp.q0), hp.global_held
        dk_g, dv_g = dglob.rows(a, b)
        rows(dkraw, (a, b), base=hp.q0).add_(dk_g)
        rows(dv, (a, b), base=hp.q0).add_(dv_g)
    return sent
