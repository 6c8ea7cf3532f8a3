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

every partial merged into one fp32 (out, lse) accumulator: one softmax over both branches.
Backward: each tile's exact gradient from the FINAL lse and delta = rowsum(dout * out); halo
dK/dV go back to their owners, global dK/dV run up the relay, summed on the way.

Tensors here are (B, H, S, D) (heads before sequence); lse and delta are (B, H, S).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm import P2P, Pending, nbytes, pack, unpack
from ..groups import RingGroups
from ..kernels import BlockKernel
from ..merge import acc_dtype, empty_accumulator, merge_
from .mask import LambdaMask, Tile, global_bias, global_tiles, local_bias, local_tiles
from .plan import HaloPlan

HALO, HALO_GRAD, GLOBAL, GLOBAL_GRAD = "lambda_halo", "lambda_halo_grad", "lambda_global", "lambda_global_grad"


@dataclass(frozen=True, slots=True)
class LambdaPlan:
    """Everything a Λ-mask pass needs besides the tensors."""

    mask: LambdaMask
    scale: float
    kernel: BlockKernel
    groups: RingGroups
    halo: HaloPlan
    block: int
    timeout: float | None = None


def _seq(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of x (B, H, S, ...) along the sequence dim."""
    return x[:, :, a:b]


def _kv_specs(like: torch.Tensor, n: int, dtype) -> list:
    shape = (like.shape[0], like.shape[1], n, like.shape[3])
    return [(shape, dtype), (shape, dtype)]


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
    halo_ch, glob_ch = _channels(plan, (HALO, GLOBAL))

    halo_pend = None
    if hp.halo_from or hp.halo_to:
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
    q0, q1, dev = hp.q0, hp.q1, qr.device
    adt = acc_dtype(qr.dtype)
    halo_ch, glob_ch = _channels(plan, (HALO_GRAD, GLOBAL_GRAD))
    spec = lambda n: _kv_specs(kr, n, adt)  # noqa: E731  (gradients travel in the accumulation dtype)

    # Gradients for my rows come back from the successors my halo rows went to.
    back_pend = halo_ch.post(step=0, recvs=[(r.peer, nbytes(spec(r.n))) for r in hp.halo_to], device=dev) if hp.halo_to else None
    up_pend = glob_ch.post(step=0, recvs=[(hp.rank + 1, nbytes(spec(hp.global_out)))], device=dev) if hp.global_out else None

    delta = (dout.to(adt) * out.to(adt)).sum(-1)  # (B, H, S)
    dqr = torch.zeros(qr.shape, dtype=adt, device=dev)
    dqs = torch.zeros(qs.shape, dtype=adt, device=dev)
    dkr = torch.zeros(kr.shape, dtype=adt, device=dev)
    dkraw = torch.zeros(kraw.shape, dtype=adt, device=dev)
    dv = torch.zeros(v.shape, dtype=adt, device=dev)
    dhalo = _Keys(halo.start, torch.zeros(halo.k.shape, dtype=adt, device=dev), torch.zeros(halo.v.shape, dtype=adt, device=dev))
    dglob = _Keys(0, torch.zeros(glob.k.shape, dtype=adt, device=dev), torch.zeros(glob.v.shape, dtype=adt, device=dev))

    def run(tiles: list[Tile], q, dq, keys: _Keys, dkeys: _Keys, is_global: bool) -> None:
        for t in tiles:
            a, b = t.q0 - q0, t.q1 - q0
            kk, vv = keys.rows(t.k0, t.k1)
            g_q, g_k, g_v = kern.backward(_seq(dout, a, b), _seq(q, a, b), kk, vv, _seq(lse, a, b), _seq(delta, a, b),
                                          causal=False, mask=_bias(t, plan, is_global, q.dtype, dev), scale=scale)
            _seq(dq, a, b).add_(g_q)
            dk_t, dv_t = dkeys.rows(t.k0, t.k1)
            dk_t.add_(g_k)
            dv_t.add_(g_v)

    n_local = plan.mask.n_local
    run(local_tiles(q0, q1, q0, q1, n_local, plan.block), qr, dqr, _Keys(q0, kr, v), _Keys(q0, dkr, dv), False)
    if hp.halo_from:
        run(local_tiles(q0, q1, hp.halo_start, q0, n_local, plan.block), qr, dqr, halo, dhalo, False)
    if hp.global_used:
        run(global_tiles(q0, q1, hp.global_used, plan.mask, plan.block), qs, dqs, glob, dglob, True)

    sends = []
    if hp.halo_from:
        sends = [(r.peer, pack(list(dhalo.rows(r.k0, r.k1)))) for r in hp.halo_from]
        halo_send = halo_ch.post(step=1, sends=sends)
    if up_pend is not None:  # gradients of [0, global_out) from everyone after me
        gk, gv = unpack(up_pend.wait()[0], spec(hp.global_out))
        dk_g, dv_g = dglob.rows(0, hp.global_out)
        dk_g.add_(gk)
        dv_g.add_(gv)
    up_send = None
    if hp.global_in:
        up_send = glob_ch.post(step=1, sends=[(hp.rank - 1, pack(list(dglob.rows(0, hp.global_in))))])
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
    if hp.halo_from:
        halo_send.wait()
    if up_send is not None:
        up_send.wait()
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
