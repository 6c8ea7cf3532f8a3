"""A block kernel for backward passes whose delta carries a gradient of the lse.

With ``ringrt.attention(return_lse=True)`` the lse is an output, and its gradient dlse enters the
backward as delta - dlse (``merge.grad_delta``). The fused kernels never take delta: they take the
final ``out`` and compute rowsum(dout * out) themselves, and the plain schedules hand them the real
output rows where they hold them. :class:`LseGradKernel` wraps such a kernel and makes delta the
truth: it always hands over the surrogate O' = delta * dout / |dout|^2 (``kernels.surrogate_out``),
whatever ``out`` the schedule passed.

One case no O' can express: a row whose dout is 0 (its output gets no gradient: a loss on the lse
alone, or a padded row) but whose delta is not. Its dS = -P * delta, the gradient of a block whose
values are all 0 with dout = e_0 and out = delta * e_0 (dP = 0, rowsum(dout * out) = delta), so one
more kernel call with V = 0 adds it to dq and dk (the first call sees those rows with delta = 0, so
kernels that read delta, like ``math``, and kernels that read out agree). It runs only for blocks that hold such a row
(one host read per block, which on CUDA is a sync: the price of an lse gradient there).
"""

from __future__ import annotations

import torch

from .kernels import BlockKernel, surrogate_out


class LseGradKernel:
    """``kernel`` with a backward that takes ``delta`` (B, H, Sq) as given and ignores ``out``."""

    def __init__(self, kernel: BlockKernel):
        self.inner, self.name = kernel, kernel.name

    def forward(self, q, k, v, *, causal, mask, scale):
        return self.inner.forward(q, k, v, causal=causal, mask=mask, scale=scale)

    def backward(self, dout, q, k, v, lse, delta, *, causal, mask, scale, out=None):
        kw = dict(causal=causal, mask=mask, scale=scale)
        stray = (dout == 0).all(-1) & (delta != 0)  # (B, H, Sq): rows O' cannot carry (NaN delta included)
        if not bool(stray.any()):
            return self.inner.backward(dout, q, k, v, lse, delta, out=surrogate_out(dout, delta), **kw)
        # the stray rows' delta moves to the second call, so kernels that read delta and kernels that
        # read out see the same problem in both
        zero = torch.zeros_like(delta)
        rest, c = torch.where(stray, zero, delta), torch.where(stray, delta, zero)
        dq, dk, dv = self.inner.backward(dout, q, k, v, lse, rest, out=surrogate_out(dout, rest), **kw)
        e0 = torch.zeros_like(dout)
        e0[..., 0] = 1
        dq0, dk0, _ = self.inner.backward(e0, q, k, torch.zeros_like(v), lse, c, out=e0 * c.unsqueeze(-1).to(e0.dtype), **kw)
        return dq + dq0, dk + dk0, dv
