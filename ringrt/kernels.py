"""Local block attention with log-sum-exp: the one compute primitive every schedule composes.

Layout (B, H, S, D) throughout. K/V may have fewer heads than Q (GQA/MQA: H a multiple of H_kv).

``forward(q, k, v, causal=, mask=, scale=) -> (out, lse)``
    q (B, H, Sq, D), k/v (B, H_kv, Sk, D) -> out (B, H, Sq, D) in q.dtype, lse (B, H, Sq) in fp32
    (fp64 for fp64 inputs). ``causal`` is a TOP-LEFT causal mask (query i sees keys <= i of the
    block): only right for a diagonal block whose query i and key i are the same token. Any other
    block must pass an explicit additive ``mask`` of shape (Sq, Sk) or (B|1, H|1, Sq, Sk).
    A row that sees no key returns out = 0 and lse = -inf (never NaN).

``backward(dout, q, k, v, lse, delta, causal=, mask=, scale=, out=None) -> (dq, dk, dv)``
    Gradients of one block given the FINAL lse of the query rows (B, H, Sq) and
    delta = rowsum(dout * out_final) (B, H, Sq): exact per-block contributions that sum to the full
    gradient. Rows with lse = -inf contribute nothing. A caller that holds the final output rows
    (B, H, Sq, D) passes them as ``out``; otherwise kernels that want it rebuild one from delta
    (:func:`surrogate_out`).

Backends: ``cpu`` (aten's flash kernel for CPU), ``cuda`` (``kernels_cuda.py``: flash-attn 2.6-2.8 when
installed and able, else aten's CUDA efficient-attention kernel, else ``math`` for fp64; every backend
meets this contract, see ``kernels_cuda.choose_cuda_path`` for which one runs a block), ``math`` (plain
matmuls in fp32/fp64; slow, any device).
"""

from __future__ import annotations

from typing import Protocol

import torch

_NEG_INF = float("-inf")


class BlockKernel(Protocol):
    name: str

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, mask: torch.Tensor | None, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lse: torch.Tensor,
        delta: torch.Tensor,
        *,
        causal: bool,
        mask: torch.Tensor | None,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _empty_rows(mask: torch.Tensor | None, lse_shape: torch.Size) -> torch.Tensor | None:
    """(B|1, H|1, Sq) bool: rows whose mask entries are all -inf, or None without a mask or such rows.
    CPU only: ``bool(...)`` is a host sync, free on CPU but a stream stall per block on CUDA (the CUDA
    kernel masks unconditionally instead)."""
    if mask is None:
        return None
    empty = torch.isneginf(mask).all(dim=-1)
    if not bool(empty.any()):
        return None
    while empty.dim() < len(lse_shape):
        empty = empty.unsqueeze(0)
    return empty


def surrogate_out(dout: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A tensor O' with rowsum(dout * O') == delta, for kernels that take ``out`` instead of delta.

    Flash-style backward kernels use ``out`` only through delta = rowsum(dout * out), so shipping the
    (B, H, S) delta instead of the (B, H, S, D) out and rebuilding O' = delta * dout / |dout|^2 on the
    receiver gives the same gradients while moving D times fewer bytes.
    """
    d32 = dout.to(delta.dtype)
    norm = torch.linalg.vector_norm(d32, dim=-1, keepdim=True).square_()  # no (B, H, S, D) temporary
    coef = torch.where(norm > 0, delta.unsqueeze(-1) / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    return (coef * d32).to(dout.dtype)


class CpuKernel:
    """aten._scaled_dot_product_flash_attention_for_cpu and its backward."""

    name = "cpu"

    def forward(self, q, k, v, *, causal, mask, scale):
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        if mask is not None:
            mask = mask.to(q.dtype)
        out, lse = op(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        empty = _empty_rows(mask, lse.shape)
        if empty is not None:  # the kernel reports lse = 0 for such rows: that would weigh them e^0
            lse = lse.masked_fill(empty, _NEG_INF)
            out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        return out, lse

    def backward(self, dout, q, k, v, lse, delta, *, causal, mask, scale, out=None):
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        if mask is not None:
            mask = mask.to(q.dtype)
        # P = exp(s - lse): lse = +inf makes a row that saw nothing contribute exactly 0.
        lse = torch.where(torch.isneginf(lse), float("inf"), lse).contiguous()
        out = surrogate_out(dout, delta) if out is None else out
        dq, dk, dv = op(dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
        return dq, dk, dv


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    g = heads // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def _fold_kv(dx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, h, s, d = dx.shape
    return dx if h == kv_heads else dx.view(b, kv_heads, h // kv_heads, s, d).sum(2)


def _full_mask(causal: bool, mask: torch.Tensor | None, sq: int, sk: int, device, dtype) -> torch.Tensor | None:
    if causal:
        tri = torch.ones(sq, sk, dtype=torch.bool, device=device).tril()
        m = torch.zeros(sq, sk, dtype=dtype, device=device).masked_fill(~tri, _NEG_INF)
        return m if mask is None else m + mask.to(dtype)
    return None if mask is None else mask.to(dtype)


class MathKernel:
    """Plain matmul + softmax in the accumulation dtype. Slow; any device; no special kernels."""

    name = "math"

    def _scores(self, q, k, causal, mask, scale):
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = torch.matmul(q.to(dt), _expand_kv(k, q.shape[1]).to(dt).transpose(-1, -2)) * scale
        m = _full_mask(causal, mask, q.shape[2], k.shape[2], q.device, dt)
        return s if m is None else s + m

    def forward(self, q, k, v, *, causal, mask, scale):
        s = self._scores(q, k, causal, mask, scale)  # (B, H, Sq, Sk)
        lse = torch.logsumexp(s, dim=-1)  # (B, H, Sq)
        p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num_(nan=0.0)
        out = torch.matmul(p, _expand_kv(v, q.shape[1]).to(p.dtype))
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, lse, delta, *, causal, mask, scale, out=None):
        s = self._scores(q, k, causal, mask, scale)
        dt = s.dtype
        p = torch.exp(s - lse.to(dt).unsqueeze(-1)).nan_to_num_(nan=0.0)  # (B, H, Sq, Sk)
        ke, ve, do = _expand_kv(k, q.shape[1]).to(dt), _expand_kv(v, q.shape[1]).to(dt), dout.to(dt)
        dv = torch.matmul(p.transpose(-1, -2), do)
        ds = p * (torch.matmul(do, ve.transpose(-1, -2)) - delta.to(dt).unsqueeze(-1))
        dq = torch.matmul(ds, ke) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q.to(dt)) * scale
        kvh = k.shape[1]
        return dq.to(q.dtype), _fold_kv(dk, kvh).to(k.dtype), _fold_kv(dv, kvh).to(v.dtype)


KERNELS = ("auto", "cpu", "cuda", "math")


def get_kernel(device: torch.device, name: str = "auto") -> BlockKernel:
    """The block kernel for ``device``: ``auto`` picks ``cuda`` on CUDA tensors, else ``cpu``."""
    if name not in KERNELS:
        raise ValueError(f"kernel={name!r} is not a known kernel; valid: {', '.join(KERNELS)}")
    if name == "auto":
        name = "cuda" if device.type == "cuda" else "cpu"
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"kernel='cuda' needs CUDA tensors, got device {device}")
        from .kernels_cuda import CudaKernel  # CUDA-only code (and the optional flash-attn) loads on demand

        return CudaKernel()
    return CpuKernel() if name == "cpu" else MathKernel()


def __getattr__(name: str):
    if name == "CudaKernel":  # ``from ringrt.kernels import CudaKernel`` without importing it for CPU runs
        from .kernels_cuda import CudaKernel

        return CudaKernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
