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

NaN: it comes out exactly where the result mathematically depends on a NaN input, nowhere else.
A query row *attends* key j when the block's mask (``causal`` and/or ``mask``) does not hide j from
it (-inf); masked keys do not contribute, not even as 0·NaN (plain ``softmax(s) @ v`` spreads a NaN
value at a masked position to every row; the math does not, and neither do we). So, per block:

* out row i and lse i are NaN when q row i has a NaN and the row attends any key, or when the row
  attends a key row with a NaN (every score of the row is then NaN);
* out[i, d] is also NaN when the row attends a value row whose coordinate d is NaN (its lse stays
  finite: the lse does not depend on v); merging carries both on (``merge.py``);
* every other row is finite and exact; a row that attends no key still gives out = 0, lse = -inf.

Backward, from the same dependencies (P = exp(s - lse), dS = P * (dout @ vᵀ - delta)): dS[i, j] is
NaN for attended (i, j) when lse i, delta i, q row i, dout row i, k row j or v row j has a NaN;
dq row i / dk row j are NaN when any dS in their row / column is; dv[j, d] is NaN when an attending
row i has a NaN lse or q row (a NaN P), or a NaN dout[i, d]. All else is finite and exact.

``cpu`` and ``math`` meet this exactly: a NaN anywhere in the operands (one cheap reduction per
operand, a free host read on the CPU) sends the block to a path that runs the kernel on copies with
NaN replaced by 0 and then writes NaN where the rules say (aten's CPU kernel alone returns out = 0,
lse = 0 for a NaN query row without a mask, and NaN in every row for a NaN value at a masked
position). On CUDA the ``math`` path applies the rules unconditionally (no host sync). The fused
``flash``/``efficient`` paths give a row that attends a NaN a NaN lse (flash-attn writes +inf there,
as for a row that sees no key; the two are told apart by the mask, not by the result), so merging
makes the row NaN; but, like any fused kernel, they may also spread a NaN key/value at a masked
position of a tile they compute: no host sync or extra pass over the block is paid to stop that.

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
    """aten._scaled_dot_product_flash_attention_for_cpu and its backward (NaN rule: module docstring)."""

    name = "cpu"

    def forward(self, q, k, v, *, causal, mask, scale):
        if _may_hold_nan(q, k, v):
            return nan_forward(self._forward, q, k, v, causal=causal, mask=mask, scale=scale)
        return self._forward(q, k, v, causal=causal, mask=mask, scale=scale)

    def backward(self, dout, q, k, v, lse, delta, *, causal, mask, scale, out=None):
        if _may_hold_nan(dout, q, k, v, lse, delta, out):
            return nan_backward(self._backward, dout, q, k, v, lse, delta, causal=causal, mask=mask, scale=scale, out=out)
        return self._backward(dout, q, k, v, lse, delta, causal=causal, mask=mask, scale=scale, out=out)

    def _forward(self, q, k, v, *, causal, mask, scale):
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        if mask is not None:
            mask = mask.to(q.dtype)
        out, lse = op(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        empty = _empty_rows(mask, lse.shape)
        if empty is not None:  # the kernel reports lse = 0 for such rows: that would weigh them e^0
            lse = lse.masked_fill(empty, _NEG_INF)
            out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        return out, lse

    def _backward(self, dout, q, k, v, lse, delta, *, causal, mask, scale, out=None):
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
    """Plain matmul + softmax in the accumulation dtype. Slow; any device; no special kernels.

    NaN rule (module docstring): on the CPU only blocks holding a NaN take the rule's path (the check
    is a free host read there); on other devices every block does (a host read would stall the stream).
    """

    name = "math"

    def forward(self, q, k, v, *, causal, mask, scale):
        if q.device.type != "cpu" or _may_hold_nan(q, k, v):
            return nan_forward(self._forward, q, k, v, causal=causal, mask=mask, scale=scale)
        return self._forward(q, k, v, causal=causal, mask=mask, scale=scale)

    def backward(self, dout, q, k, v, lse, delta, *, causal, mask, scale, out=None):
        if q.device.type != "cpu" or _may_hold_nan(dout, q, k, v, lse, delta, out):
            return nan_backward(self._backward, dout, q, k, v, lse, delta, causal=causal, mask=mask, scale=scale, out=out)
        return self._backward(dout, q, k, v, lse, delta, causal=causal, mask=mask, scale=scale, out=out)

    def _scores(self, q, k, causal, mask, scale):
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = torch.matmul(q.to(dt), _expand_kv(k, q.shape[1]).to(dt).transpose(-1, -2)) * scale
        m = _full_mask(causal, mask, q.shape[2], k.shape[2], q.device, dt)
        return s if m is None else s + m

    def _probs(self, s, lse):
        """P = exp(s - lse) (B, H, Sq, Sk) for NaN-free scores: masked entries (s = -inf) are 0, and a
        row that saw no key (lse = -inf) is all 0 (lse taken as +inf there instead of -inf - -inf = NaN)."""
        return torch.exp(s - torch.where(torch.isneginf(lse), float("inf"), lse).unsqueeze(-1))

    def _forward(self, q, k, v, *, causal, mask, scale):
        s = self._scores(q, k, causal, mask, scale)  # (B, H, Sq, Sk)
        lse = torch.logsumexp(s, dim=-1)  # (B, H, Sq)
        p = self._probs(s, lse)
        out = torch.matmul(p, _expand_kv(v, q.shape[1]).to(p.dtype))
        return out.to(q.dtype), lse

    def _backward(self, dout, q, k, v, lse, delta, *, causal, mask, scale, out=None):
        s = self._scores(q, k, causal, mask, scale)
        dt = s.dtype
        p = self._probs(s, lse.to(dt))  # (B, H, Sq, Sk)
        ke, ve, do = _expand_kv(k, q.shape[1]).to(dt), _expand_kv(v, q.shape[1]).to(dt), dout.to(dt)
        dv = torch.matmul(p.transpose(-1, -2), do)
        ds = p * (torch.matmul(do, ve.transpose(-1, -2)) - delta.to(dt).unsqueeze(-1))
        dq = torch.matmul(ds, ke) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q.to(dt)) * scale
        kvh = k.shape[1]
        return dq.to(q.dtype), _fold_kv(dk, kvh).to(k.dtype), _fold_kv(dv, kvh).to(v.dtype)


# ---- the NaN rule (module docstring): run the kernel on NaN-free copies, then write NaN where it belongs


def _may_hold_nan(*xs: torch.Tensor | None) -> bool:
    """False only if no tensor holds a NaN. A sum per tensor (a NaN makes it NaN; an overflow to
    +inf and -inf may too: a false alarm, which costs time, never a wrong result) and one host read:
    ~30x cheaper than ``isnan(x).any()`` on the CPU. Off the CPU the read would stall the device's
    queue, so there the answer is True (the rule's path is sync-free)."""
    if any(x is not None and x.device.type != "cpu" for x in xs):
        return True
    total = sum(x.sum(dtype=torch.float32 if x.dtype != torch.float64 else x.dtype) for x in xs if x is not None)
    return bool(torch.isnan(total))


def _no_nan(x: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(torch.isnan(x), 0.0)


def attended(causal: bool, mask: torch.Tensor | None, sq: int, sk: int, device) -> torch.Tensor:
    """(B|1, H|1, Sq, Sk) bool: True where a query row attends a key (neither ``causal``'s top-left
    triangle nor a -inf of ``mask`` hides it). A row with no True attends nothing."""
    a = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        a = a.tril()
    if mask is not None:
        a = a & ~torch.isneginf(mask)
    while a.dim() < 4:
        a = a.unsqueeze(0)
    return a


def _hits(a: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """(B, H, Sq, X) bool: a (B|1, H|1, Sq, Sk) row attends some k with bad[..., k, x] ((B, H, Sk, X))."""
    return torch.matmul(a.to(torch.float32), bad.to(torch.float32)) > 0


def _fold_any(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, Sk, ...) bool -> (B, H_kv, Sk, ...): any over each K/V head's query group."""
    b, h = x.shape[:2]
    return x if h == kv_heads else x.view(b, kv_heads, h // kv_heads, *x.shape[2:]).any(2)


def nan_forward(raw, q, k, v, *, causal, mask, scale):
    """``raw`` (a NaN-free kernel forward) on NaN-free copies, then NaN by the rule (module docstring)."""
    out, lse = raw(_no_nan(q), _no_nan(k), _no_nan(v), causal=causal, mask=mask, scale=scale)
    h = q.shape[1]
    a = attended(causal, mask, q.shape[2], k.shape[2], q.device)  # (B|1, H|1, Sq, Sk)
    k_bad = _expand_kv(torch.isnan(k).any(-1, keepdim=True), h)  # (B, H, Sk, 1)
    row = (torch.isnan(q).any(-1) & a.any(-1)) | _hits(a, k_bad).squeeze(-1)  # (B, H, Sq): every score NaN
    elem = _hits(a, _expand_kv(torch.isnan(v), h))  # (B, H, Sq, D): out[i, d] sums a NaN v[j, d]
    return out.masked_fill(row.unsqueeze(-1) | elem, float("nan")), lse.masked_fill(row, float("nan"))


def nan_backward(raw, dout, q, k, v, lse, delta, *, causal, mask, scale, out=None):
    """``raw`` (a NaN-free kernel backward) on NaN-free copies, then NaN by the rule (module docstring)."""
    row_bad = torch.isnan(lse) | torch.isnan(q).any(-1)  # (B, H, Sq): P row NaN
    d_bad = row_bad | torch.isnan(delta) | torch.isnan(dout).any(-1)  # dS row NaN
    if out is not None:
        d_bad |= torch.isnan(out).any(-1)
    dq, dk, dv = raw(_no_nan(dout), _no_nan(q), _no_nan(k), _no_nan(v), lse.masked_fill(row_bad, float("inf")),
                     _no_nan(delta), causal=causal, mask=mask, scale=scale, out=None if out is None else _no_nan(out))
    h, kvh = q.shape[1], k.shape[1]
    a = attended(causal, mask, q.shape[2], k.shape[2], q.device)  # (B|1, H|1, Sq, Sk)
    k_bad = _expand_kv(torch.isnan(k).any(-1, keepdim=True), h).squeeze(-1)  # (B, H, Sk)
    v_bad = _expand_kv(torch.isnan(v).any(-1, keepdim=True), h).squeeze(-1)
    ds_bad = a & (d_bad.unsqueeze(-1) | (k_bad | v_bad).unsqueeze(-2))  # (B, H, Sq, Sk)
    p_bad = a & (row_bad.unsqueeze(-1) | k_bad.unsqueeze(-2))
    dv_bad = p_bad.any(-2).unsqueeze(-1) | _hits(a.transpose(-1, -2), torch.isnan(dout))  # (B, H, Sk, D)
    nan = float("nan")
    return (dq.masked_fill(ds_bad.any(-1).unsqueeze(-1), nan),
            dk.masked_fill(_fold_any(ds_bad.any(-2), kvh).unsqueeze(-1), nan),
            dv.masked_fill(_fold_any(dv_bad, kvh), nan))


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
    if name == "CudaKernel":  # ``from ringrt.ops.kernels import CudaKernel`` without importing it for CPU runs
        from .kernels_cuda import CudaKernel

        return CudaKernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
