"""TokenRing attention: forward and backward over a process group (``algorithm="tokenring"``).

The ring loop only composes four pieces: the plan (``tokenring_plan.py``, pure integers), the
communication (``ringrt.distributed.comm``), the local block kernel (``ringrt.ops.kernels``) and the
merge (``ringrt.ops.merge``). See Note [TokenRing] in ``tokenring_plan.py`` for the picture.

Backward mirrors the forward. For the block (Q_o visiting rank r, K_r, V_r), with the FINAL lse_o
and delta_o = rowsum(dO_o * O_o)::

    P = exp(scale * Q_o K_r^T - lse_o);  dV_r += P^T dO_o;  dS = P * (dO_o V_r^T - delta_o)
    dK_r += scale * dS^T Q_o;            dQ_o += scale * dS K_r      <- partial, owned by o

so (q, dout, lse, delta) travel along the query path, the dq partials travel back along the result
path, and dK/dV accumulate where K/V live: K, V, dK and dV never move. Shipping delta (B, H, S)
rather than out (B, H, S, D) keeps the query-path message at 2 x q plus two scalars per row.

The query path runs on the first lane of ``RingGroups`` (channel "q"), the result path on the second
(channel "out"); in the relay topology the two head halves take one lane each.

Note [TokenRing overlap]
------------------------
A rank's work after its own block is W - 1 blocks, each on queries that come straight from their
owner over a different link (step s: from r + s), each giving a partial that goes straight back
(to r + s) over yet another. In lock step (step s's queries posted one step ahead) every link is
idle while the others carry their step, the first block waits for a whole query bundle, and the
last partial returns alone. Instead, the queries are cut into head pieces (``head_pieces``, about
PIECE_BYTES each) and the units (piece k, step s) run piece-major::

    post: every unit's query receive + send (and, on gloo, its partial receive), in unit order,
          within INFLIGHT_BYTES of receive buffers
    compute: own block, first head half
             for k in pieces: for s in 1 .. W-1: wait q(k, s); block; post partial(k, s)
             own block, second head half (under the last partials' return)
    absorb: at the end, in unit order (results do not depend on timing); when INFLIGHT_BYTES
            holds units back, the partials of piece k - 1 after piece k's blocks

so all W - 1 query streams move at once (one per link on a full mesh, sharing a rank's uplink
behind a switch), a block starts when its first piece is in, and a partial leaves as soon as its
piece is done. Every rank posts the units in the same order and each unit pairs a send to
r - s with a receive from r + s (queries) or a send to r + s with a receive from r - s (partials),
so on NCCL, where each post is one group, the posts of all ranks match one for one. On gloo the
partial receives are posted ahead (a receive posted after the peer's send turns the link
half-duplex); on NCCL a receive posted alone would hold up its stream, so there it goes with its
send.

All tensors here are (B, H, S, D) (heads before sequence); lse and delta are (B, H, S).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..distributed.comm import P2P, Pending, nbytes, pack, unpack
from ..ops.layout import local_chunks
from ..ops.merge import acc_dtype, empty_accumulator, grad_delta, merge_
from .base import RingPlan, attend_blocks, seq_first_pass
from .blocks import Block, Rows, n_rows, rows
from . import tokenring_plan
from .tokenring_plan import head_pieces, relay_schedule, tokenring_schedule


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

Heads = tuple[tuple[int, int], tuple[int, int]] | None  # (query heads, kv heads) of a split block; None: all
Compute = Callable[[Block, list[torch.Tensor], Heads], list[torch.Tensor]]
Absorb = Callable[[Rows, list[torch.Tensor], Heads], None]


def _direct_pass(
    plan: RingPlan, bundle: list[torch.Tensor], partial_like: list[torch.Tensor], kv_heads: int, compute: Compute,
    absorb: Absorb,
) -> None:
    """Run the W steps of one rank.

    bundle: tensors (B, H, S, ...) of this rank's queries that travel (q; or q, dout, lse, delta).
    partial_like: tensors shaped like one partial result over all S rows (for receive sizes).
    kv_heads: this rank's kv heads (pieces and the own block split heads on kv-group boundaries).
    compute(block, bundle rows, heads) -> partial over block.q_rows (of the query heads ``heads[0]``
    against the kv heads ``heads[1]``; all heads when None); absorb(rows, partial, heads) folds a
    partial result of this rank's own queries into its accumulators.

    See Note [TokenRing overlap] for the order of transfers and compute.
    """
    _DirectPass(plan, bundle, partial_like, kv_heads, compute, absorb).run()


class _Unit:
    """Piece ``k`` of the queries held at step ``s``: its transfers in flight and where it lands."""

    __slots__ = ("k", "s", "q", "out_recv")

    def __init__(self, k: int, s: int):
        self.k, self.s = k, s
        self.q: Pending | None = None  # this unit's query send + receive
        self.out_recv: Pending | None = None  # gloo: the partial of this rank's queries coming back


class _DirectPass:
    def __init__(self, plan: RingPlan, bundle: list[torch.Tensor], partial_like: list[torch.Tensor], kv_heads: int,
                 compute: Compute, absorb: Absorb):
        g = plan.groups
        self.world, self.bundle, self.partial_like = g.world, bundle, partial_like
        self.compute, self.absorb = compute, absorb
        self.chunk = bundle[0].shape[2] // local_chunks(plan.layout)
        self.dev = bundle[0].device
        self.qc = P2P(g.lanes[0], "q", plan.timeout) if g.world > 1 else None
        self.oc = P2P(g.lanes[1], "out", plan.timeout) if g.world > 1 else None
        self.steps = tokenring_schedule(g.rank, g.world, plan.causal, plan.layout)
        b, h, s = bundle[0].shape[:3]
        split = head_split(h, kv_heads)
        # the own block in two head halves (one before the transfers, one under the last return), where
        # it is big enough for the overlap to beat the cost of one more kernel call
        big = b * h * s * s >= tokenring_plan.SPLIT_MIN_SCORES
        self.halves: list[Heads] = list(split) if g.world > 1 and len(split) == 2 and big else [None]
        self.pieces = head_pieces(h, kv_heads, tokenring_plan.n_pieces(sum(t.numel() * t.element_size() for t in bundle)))
        self.units = [_Unit(k, st) for k in range(len(self.pieces)) for st in range(1, g.world)
                      if self.steps[st].held is not None or self.steps[st - 1].q_send is not None
                      or self.steps[st].out_send is not None or self.steps[st].out_recv is not None]
        self.early_out = g.world > 1 and not self.oc.is_nccl(self.dev)
        self.posted = 0  # units whose transfers are posted
        self.sends: list[Pending] = []  # partial sends (and NCCL pairs) still to finish

    def piece_specs(self, like: list[torch.Tensor], k: int, r: Rows | None) -> list:
        (h0, h1), _ = self.pieces[k]
        n = 0 if r is None else n_rows(r) * self.chunk
        return [((t.shape[0], h1 - h0, n, *t.shape[3:]), t.dtype) for t in like]

    def unit_bytes(self, u: _Unit) -> int:
        st = self.steps[u.s]
        n = nbytes(self.piece_specs(self.bundle, u.k, st.held)) if st.held is not None else 0
        if self.early_out and st.out_recv is not None:
            n += nbytes(self.piece_specs(self.partial_like, u.k, st.out_recv.rows))
        return n

    def post_units(self, consumed: int) -> None:
        """Post units in order while their receive buffers stay within INFLIGHT_BYTES (at least one
        unit beyond the ``consumed`` ones). On gloo every receive of the batch goes out before its sends."""
        live = sum(self.unit_bytes(u) for u in self.units[consumed : self.posted])
        batch = []
        while self.posted < len(self.units):
            u = self.units[self.posted]
            size = self.unit_bytes(u)
            if self.posted > consumed and live + size > tokenring_plan.INFLIGHT_BYTES:
                break
            batch.append(u)
            live += size
            self.posted += 1
        sends = [self.post_receives(u) for u in batch]
        for u, unit_sends in zip(batch, sends, strict=True):
            if self.early_out and unit_sends:
                self.sends.append(self.qc.post(step=u.s, sends=unit_sends, device=self.dev))

    def post_receives(self, u: _Unit) -> list:
        """Post the unit's receives (on NCCL with its query send, as one group); returns the query
        sends still to post (gloo)."""
        st, prev = self.steps[u.s], self.steps[u.s - 1]
        (h0, h1), _ = self.pieces[u.k]
        if self.early_out and st.out_recv is not None:
            spec = self.piece_specs(self.partial_like, u.k, st.out_recv.rows)
            u.out_recv = self.oc.post(step=u.s, recvs=[(st.out_recv.peer, nbytes(spec))], device=self.dev)
        sends, recvs = [], []
        if st.held is not None:
            recvs.append((prev.q_recv.peer, nbytes(self.piece_specs(self.bundle, u.k, st.held))))
        if prev.q_send is not None:
            sends.append((prev.q_send.peer, pack([rows(t[:, h0:h1], prev.q_send.rows, self.chunk) for t in self.bundle])))
        if self.early_out:
            u.q = self.qc.post(step=u.s, recvs=recvs, device=self.dev) if recvs else None
            return sends
        if sends or recvs:
            u.q = self.qc.post(step=u.s, sends=sends, recvs=recvs, device=self.dev)
        return []

    def own_half(self, i: int) -> None:
        own = self.steps[0]
        if own.block is None or i >= len(self.halves):
            return
        heads = self.halves[i]
        part = [rows(t, own.block.q_rows, self.chunk, own.held[0]) for t in self.bundle]
        if heads is not None:
            part = [t[:, heads[0][0] : heads[0][1]] for t in part]
        self.absorb(own.block.q_rows, self.compute(own.block, part, heads), heads)

    def run_unit(self, u: _Unit) -> None:
        """Wait for the unit's queries, compute its block, send the partial home."""
        st = self.steps[u.s]
        bufs = u.q.wait() if u.q is not None else []
        held = unpack(bufs[0], self.piece_specs(self.bundle, u.k, st.held)) if st.held is not None else None
        partial = None
        if st.block is not None:
            part = [rows(t, st.block.q_rows, self.chunk, st.held[0]) for t in held]
            partial = self.compute(st.block, part, self.pieces[u.k])
        sends = [(st.out_send.peer, pack(partial))] if st.out_send is not None else []
        recvs = []
        if not self.early_out and st.out_recv is not None:
            recvs = [(st.out_recv.peer, nbytes(self.piece_specs(self.partial_like, u.k, st.out_recv.rows)))]
        if sends or recvs:
            p = self.oc.post(step=u.s, sends=sends, recvs=recvs, device=self.dev)
            if recvs:
                u.out_recv = p
            else:
                self.sends.append(p)

    def absorb_unit(self, u: _Unit) -> None:
        st = self.steps[u.s]
        if u.out_recv is not None:
            bufs = u.out_recv.wait()
            r = st.out_recv.rows
            self.absorb(r, unpack(bufs[-1], self.piece_specs(self.partial_like, u.k, r)), self.pieces[u.k])

    def run(self) -> None:
        if self.world > 1:
            self.post_units(0)
        self.own_half(0)
        absorbed = 0
        per_piece = len(self.units) // max(1, len(self.pieces))
        # with every unit in flight at once the partials are folded in at the end (a wait for a slow
        # peer's partial would stall the blocks); when INFLIGHT_BYTES holds units back, piece by piece
        lag = self.posted < len(self.units)
        for i, u in enumerate(self.units):
            self.run_unit(u)
            self.post_units(i + 1)
            # after a piece's blocks, fold in the partials of the piece before (in order)
            if lag and per_piece and (i + 1) % per_piece == 0:
                while absorbed < i + 1 - per_piece:
                    self.absorb_unit(self.units[absorbed])
                    absorbed += 1
        self.own_half(1)
        for u in self.units[absorbed:]:
            self.absorb_unit(u)
        for p in self.sends:
            p.wait()


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
    chans = [P2P(g.lanes[0], "q", plan.timeout), P2P(g.lanes[1], "out", plan.timeout)] if g.world > 1 else []
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


class _OwnKeys:
    """This rank's K/V (B, H_kv, S, D) cut into blocks, and the backward's dK/dV accumulators (created
    on first use: the gradient of a first block that covers every key row of every head becomes them)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, plan: RingPlan, chunk: int):
        self.k, self.v, self.plan, self.chunk = k, v, plan, chunk
        self.all_rows = (0, local_chunks(plan.layout))
        self.adt = acc_dtype(k.dtype)
        self.grads: list[torch.Tensor] = []  # [dK, dV], fp32/fp64

    def heads(self, heads: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the kv heads ``heads`` (all when None)."""
        if heads is None:
            return self.k, self.v
        return self.k[:, heads[0] : heads[1]], self.v[:, heads[0] : heads[1]]

    def grad(self, block: Block, qq, do, ll, dd, heads: tuple[int, int] | None = None, out=None) -> torch.Tensor:
        """Gradients of ``block`` for the query rows qq with their dout, lse and delta (and ``out`` when
        at hand): dK/dV folded into the accumulators, the dq partial returned."""
        kk, vv = (rows(x, block.k_rows, self.chunk) for x in self.heads(heads))
        dq, dk, dv = self.plan.kernel.backward(do, qq, kk, vv, ll, dd, causal=block.diagonal, mask=None,
                                               scale=self.plan.scale, out=out)

        def fold() -> None:
            dk_all, dv_all = self.grads
            if heads is not None:
                dk_all, dv_all = dk_all[:, heads[0] : heads[1]], dv_all[:, heads[0] : heads[1]]
            rows(dk_all, block.k_rows, self.chunk).add_(dk)
            rows(dv_all, block.k_rows, self.chunk).add_(dv)

        def fresh() -> list[torch.Tensor]:
            return [torch.zeros(x.shape, dtype=self.adt, device=x.device) for x in (self.k, self.v)]

        _accumulate(self.grads, [dk, dv], self.adt, heads is None and block.k_rows == self.all_rows, fresh, fold)
        return dq

    def grad_result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """dK, dV in the dtypes of K and V."""
        if not self.grads:
            return torch.zeros_like(self.k), torch.zeros_like(self.v)
        return self.grads[0].to(self.k.dtype), self.grads[1].to(self.v.dtype)


def _relayed(plan: RingPlan) -> bool:
    return plan.topology == "ring" and plan.groups.world > 1


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, S, D), k/v (B, H_kv, S, D) local shards -> out (B, H, S, D) q.dtype, lse (B, H, S) fp32/fp64."""
    own = _OwnKeys(k, v, plan, q.shape[2] // local_chunks(plan.layout))
    if _relayed(plan):
        return _relay_forward(plan, q, own)
    chunk, adt = own.chunk, acc_dtype(q.dtype)
    acc: list[torch.Tensor] = []  # [out, lse], fp32/fp64

    def compute(block: Block, qb: list[torch.Tensor], heads: Heads) -> list[torch.Tensor]:
        kk, vv = (rows(x, block.k_rows, chunk) for x in own.heads(heads and heads[1]))
        o, lse = plan.kernel.forward(qb[0], kk, vv, causal=block.diagonal, mask=None, scale=plan.scale)
        return [o, lse.to(adt)]

    def absorb(r: Rows, part: list[torch.Tensor], heads: Heads) -> None:
        def fold() -> None:
            o, lse = acc
            if heads is not None:
                o, lse = o[:, heads[0][0] : heads[0][1]], lse[:, heads[0][0] : heads[0][1]]
            merge_(rows(o, r, chunk), rows(lse, r, chunk), part[0], part[1])

        _accumulate(acc, part, adt, heads is None and r == own.all_rows, lambda: list(empty_accumulator(q)), fold)

    partial_like = [q, torch.empty(q.shape[:-1], dtype=adt, device="meta")]
    _direct_pass(plan, [q], partial_like, k.shape[1], compute, absorb)
    if not acc:
        acc.extend(empty_accumulator(q))
    return acc[0].to(q.dtype), acc[1]


def _relay_forward(plan: RingPlan, q: torch.Tensor, own: _OwnKeys) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward in the relay topology: each head half carries its (out, lse) accumulator round."""
    split = head_split(q.shape[1], own.k.shape[1])
    bundles = [[q[:, h0:h1].contiguous(), *empty_accumulator(q[:, h0:h1])] for (h0, h1), _ in split]

    def compute(block: Block, bundle: list[torch.Tensor], d: int) -> None:
        qq, acc_o, acc_l = bundle
        attend_blocks((acc_o, acc_l), qq, *own.heads(split[d][1]), [block], kernel=plan.kernel, scale=plan.scale,
                      chunk=own.chunk)

    done = _relay_pass(plan, bundles, compute)
    out = torch.cat([b[1] for b in done], dim=1)
    lse = torch.cat([b[2] for b in done], dim=1)
    return out.to(q.dtype), lse


def ring_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, plan: RingPlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the local shards. dout/q/out (B, H, S, D), k/v (B, H_kv, S, D), lse (B, H, S)."""
    own = _OwnKeys(k, v, plan, q.shape[2] // local_chunks(plan.layout))
    delta = grad_delta(dout, out, acc_dtype(q.dtype), plan.dlse)  # (B, H, S)
    if _relayed(plan):
        dq = _relay_backward(plan, [q, dout, lse, delta], own)
    else:
        dq = _direct_backward(plan, [q, dout, lse, delta], out, own)
    return (dq.to(q.dtype), *own.grad_result())


def _direct_backward(plan: RingPlan, bundle: list[torch.Tensor], out: torch.Tensor, own: _OwnKeys) -> torch.Tensor:
    """dq (fp32/fp64) of the direct topology; bundle = [q, dout, lse, delta] of this rank's queries."""
    q, chunk, adt = bundle[0], own.chunk, acc_dtype(bundle[0].dtype)
    dq_acc: list[torch.Tensor] = []

    def compute(block: Block, b: list[torch.Tensor], heads: Heads) -> list[torch.Tensor]:
        # this rank's own queries (the diagonal block): the real output is here, no surrogate needed
        out_rows = rows(out, block.q_rows, chunk) if block.diagonal else None
        if out_rows is not None and heads is not None:
            out_rows = out_rows[:, heads[0][0] : heads[0][1]]
        return [own.grad(block, *b, heads=heads and heads[1], out=out_rows)]

    def absorb(r: Rows, part: list[torch.Tensor], heads: Heads) -> None:
        def fold() -> None:
            dq = dq_acc[0] if heads is None else dq_acc[0][:, heads[0][0] : heads[0][1]]
            rows(dq, r, chunk).add_(part[0])

        _accumulate(dq_acc, part, adt, heads is None and r == own.all_rows,
                    lambda: [torch.zeros(q.shape, dtype=adt, device=q.device)], fold)

    _direct_pass(plan, bundle, [q], own.k.shape[1], compute, absorb)
    return dq_acc[0] if dq_acc else torch.zeros(q.shape, dtype=adt, device=q.device)


def _relay_backward(plan: RingPlan, bundle: list[torch.Tensor], own: _OwnKeys) -> torch.Tensor:
    """dq (fp32/fp64) of the relay topology: each head half carries (q, dout, lse, delta) and its dq
    accumulator round; bundle = [q, dout, lse, delta] of this rank's queries."""
    q, adt = bundle[0], acc_dtype(bundle[0].dtype)
    split = head_split(q.shape[1], own.k.shape[1])
    bundles = [[t[:, h0:h1].contiguous() for t in bundle] + [torch.zeros(q[:, h0:h1].shape, dtype=adt, device=q.device)]
               for (h0, h1), _ in split]

    def compute(block: Block, b: list[torch.Tensor], d: int) -> None:
        qq, do, ll, dd, dq_acc = (rows(t, block.q_rows, own.chunk) for t in b)
        dq_acc.add_(own.grad(block, qq, do, ll, dd, split[d][1]))

    done = _relay_pass(plan, bundles, compute)
    return torch.cat([b[4] for b in done], dim=1)


tokenring_pass = seq_first_pass(ring_forward, ring_backward)
"""``algorithm="tokenring"``: q (B, S_l, H, D), k/v (B, S_l, H_kv, D) shards in ``plan.layout`` -> (B, S_l, H, D)."""
