"""Next-token cross-entropy straight from hidden states, a chunk of tokens at a time. Pure math.

``chunked_cross_entropy(hidden, weight, labels, chunk=c)`` equals
``F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")`` (values and
gradients, to rounding) without the (N, vocab) logits ever existing: the forward computes c rows of
logits at a time and keeps only their sum; the backward computes each chunk's logits again, turns
them into the softmax minus the one-hot target, and adds that chunk's share to d hidden and d weight.
At most c x vocab logits (fp32, or fp64 for fp64 hidden states) live at once, in the forward and in
the backward; the saved tensors are the hidden states, the weight and the labels (which the model
holds anyway).
"""

from __future__ import annotations

import torch

from ..ops.merge import acc_dtype

IGNORE = -100


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(c, dim) x (V, dim) -> (c, V) logits in fp32 (fp64 for fp64), the matmul in h's dtype."""
    return (h @ weight.to(h.dtype).t()).to(acc_dtype(h.dtype))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        total = torch.zeros((), dtype=acc_dtype(hidden.dtype), device=hidden.device)
        for a in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[a : a + chunk], weight)  # (c, V)
            lab = labels[a : a + chunk]
            keep = lab != IGNORE
            picked = logits.gather(1, lab.clamp_min(0).unsqueeze(1)).squeeze(1)  # (c,)
            total += ((torch.logsumexp(logits, dim=1) - picked) * keep).sum()
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, g):
        hidden, weight, labels = ctx.saved_tensors
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=acc_dtype(hidden.dtype), device=weight.device) if ctx.needs_input_grad[1] else None
        w = weight.to(hidden.dtype)
        for a in range(0, hidden.shape[0], ctx.chunk):
            h, lab = hidden[a : a + ctx.chunk], labels[a : a + ctx.chunk]
            p = torch.softmax(_chunk_logits(h, weight), dim=1)  # (c, V)
            keep = lab != IGNORE
            p[torch.arange(p.shape[0], device=p.device)[keep], lab[keep]] -= 1.0
            p *= (keep.to(p.dtype) * g.to(p.dtype)).unsqueeze(1)  # d loss / d logits
            p = p.to(hidden.dtype)
            if dh is not None:
                torch.matmul(p, w, out=dh[a : a + ctx.chunk])  # (c, dim)
            if dw is not None:
                dw += (p.t() @ h).to(dw.dtype)  # (V, dim)
        return dh, None if dw is None else dw.to(weight.dtype), None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk: int) -> torch.Tensor:
    """Sum of next-token cross-entropy over the scored rows, computed ``chunk`` rows at a time.

    hidden (N, dim) final hidden states (after the last norm), weight (V, dim) the LM head's,
    labels (N,) int64 with -100 = not scored. Returns a 0-dim fp32 (fp64 for fp64 hidden) sum,
    differentiable w.r.t. hidden and weight. ValueError for a chunk below 1.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive int (rows of logits computed at once)")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden (N, dim), weight (V, dim), labels (N,) expected, got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk)
