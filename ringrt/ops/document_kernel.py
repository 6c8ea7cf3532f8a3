"""A block kernel that keeps each document to itself (Note [document layout] in ``documents.py``).

Every tensor a schedule hands to a kernel is a run of whole virtual chunks of C rows, in ascending
global chunk order, and in every virtual chunk document i holds rows [o_i, o_i + c_i). So the
rows of document i in a block of n chunks are n runs of c_i rows, and the block's attention,
restricted to documents, is one sub-block per document: its n_q c_i query rows against its n_k c_i
key rows, under the block's own mask (top-left causal for a diagonal block: the gathered rows keep
their order, so the argument of ``blocks.py`` holds within the document). Documents with the same
c_i go to the inner kernel together, stacked on the batch dim: one call per distinct chunk size::

    block (n_q = 2 chunks, n_k = 1), C = 5, documents of c = (2, 2, 1)
    rows  q: [A A B B C | A A B B C]   k: [A A B B C]
    calls: c = 2 -> batch of A and B: q (2B, H, 4, D) x k (2B, H_kv, 2, D);  c = 1 -> C: (B, H, 2, D) x (B, H_kv, 1, D)

Forward, backward and the NaN rule are the inner kernel's (``kernels.py``), per sub-block; rows
of different documents never meet. :attr:`DocumentKernel.scores` counts the score entries the
masks keep, for the benchmarks (a diagonal block of m rows keeps m (m + 1) / 2 per batch row and head);
:func:`scores_counted` adds up every instance's forwards in this process since :func:`reset_scores`
(``ringrt bench varlen`` reads it: a kernel lives for one call only). Backward is not counted.
"""

from __future__ import annotations

import itertools

import torch

from .kernels import BlockKernel

_SCORES = [0]  # score entries kept by every DocumentKernel forward in this process since reset_scores()


def scores_counted() -> int:
    """Score entries the masks kept in every :class:`DocumentKernel` forward of this process since
    :func:`reset_scores` (the sum of their :attr:`DocumentKernel.scores`)."""
    return _SCORES[0]


def reset_scores() -> None:
    _SCORES[0] = 0


class DocumentKernel:
    """``inner`` restricted to documents of ``slots`` = (c_0, c_1, ...) rows per virtual chunk."""

    def __init__(self, inner: BlockKernel, slots: tuple[int, ...]):
        self.inner, self.name = inner, inner.name
        self.chunk = sum(slots)
        offsets = itertools.accumulate(slots, initial=0)
        by_size: dict[int, list[int]] = {}
        for c, o in zip(slots, offsets, strict=False):
            if c:
                by_size.setdefault(c, []).append(o)
        # (c, (n_docs, c) column index within a chunk, or the start of one document: a slice, no copy)
        self.groups = [(c, offs[0] if len(offs) == 1 else torch.tensor([list(range(o, o + c)) for o in offs]))
                       for c, offs in sorted(by_size.items())]
        self.scores = 0
        self._on: dict[torch.device, dict[int, torch.Tensor]] = {}  # the column indexes, moved to a device once

    def _cols(self, cols: torch.Tensor, device: torch.device) -> torch.Tensor:
        on = self._on.setdefault(device, {})
        if id(cols) not in on:
            on[id(cols)] = cols.to(device)
        return on[id(cols)]

    def _chunks(self, x: torch.Tensor) -> int:
        n, rest = divmod(x.shape[2], self.chunk)
        if rest or not n:
            raise ValueError(f"a block of {x.shape[2]} rows is not a run of whole document chunks of {self.chunk} rows")
        return n

    def _gather(self, x: torch.Tensor | None, c: int, cols) -> torch.Tensor | None:
        """Rows of the documents ``cols`` of x (B, H, n C, ...) -> (B d, H, n c, ...)."""
        if x is None:
            return None
        b, h, n = x.shape[0], x.shape[1], self._chunks(x)
        x5 = x.reshape(b, h, n, self.chunk, *x.shape[3:])
        if isinstance(cols, int):
            return x if c == self.chunk else x5[:, :, :, cols : cols + c].reshape(b, h, n * c, *x.shape[3:])
        d = cols.shape[0]
        g = x5[:, :, :, self._cols(cols, x.device)].movedim(3, 1)  # (B, d, H, n, c, ...)
        return g.reshape(b * d, h, n * c, *x.shape[3:])

    def _scatter(self, dst: torch.Tensor, y: torch.Tensor, c: int, cols) -> None:
        """Inverse of :meth:`_gather`: y (B d, H, n c, ...) into the documents' rows of dst, in place."""
        b, h, n = dst.shape[0], dst.shape[1], self._chunks(dst)
        d5 = dst.view(b, h, n, self.chunk, *dst.shape[3:])
        if isinstance(cols, int):
            d5[:, :, :, cols : cols + c] = y.reshape(b, h, n, c, *y.shape[3:])
            return
        d = cols.shape[0]
        d5[:, :, :, self._cols(cols, dst.device)] = y.reshape(b, d, h, n, c, *y.shape[3:]).movedim(1, 3)

    def _count(self, q, k, c: int, causal: bool, batch: int) -> None:
        mq, mk = self._chunks(q) * c, self._chunks(k) * c
        per = mq * (mq + 1) // 2 if causal and mq == mk else mq * mk
        self.scores += batch * q.shape[1] * per
        _SCORES[0] += batch * q.shape[1] * per

    def forward(self, q, k, v, *, causal, mask, scale):
        """q (B, H, n_q C, D), k/v (B, H_kv, n_k C, D) -> out (B, H, n_q C, D), lse (B, H, n_q C)."""
        if mask is not None:
            raise ValueError("a document kernel takes no additive mask")
        out, lse = None, None
        for c, cols in self.groups:
            qg = self._gather(q, c, cols)
            o, l = self.inner.forward(qg, self._gather(k, c, cols), self._gather(v, c, cols), causal=causal, mask=None,
                                      scale=scale)
            if out is None:
                out = q.new_empty(q.shape[:3] + o.shape[3:], dtype=o.dtype)
                lse = torch.empty(q.shape[:3], dtype=l.dtype, device=q.device)
            self._scatter(out, o, c, cols)
            self._scatter(lse, l, c, cols)
            self._count(q, k, c, causal, qg.shape[0])
        return out, lse

    def backward(self, dout, q, k, v, lse, delta, *, causal, mask, scale, out=None):
        """Gradients of :meth:`forward`'s block, document by document (shapes as the inner kernel's)."""
        if mask is not None:
            raise ValueError("a document kernel takes no additive mask")
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for c, cols in self.groups:
            g = [self._gather(x, c, cols) for x in (dout, q, k, v, lse, delta)]
            gq, gk, gv = self.inner.backward(*g, causal=causal, mask=None, scale=scale, out=self._gather(out, c, cols))
            self._scatter(dq, gq, c, cols)
            self._scatter(dk, gk, c, cols)
            self._scatter(dv, gv, c, cols)
        return dq, dk, dv
