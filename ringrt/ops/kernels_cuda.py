"""The ``cuda`` block kernel: one contract (``kernels.py``), three backends chosen per call.

Which backend runs a block is decided by :func:`choose_cuda_path`, a pure function of what the
backends can do (first match wins); the rest of this module only adapts calling conventions and layouts:

1. float64, or a dtype other than fp16/bf16/fp32 -> ``math`` (no fused kernel has it);
2. sm < 50, or bf16 on sm < 80 -> ``math`` (aten's efficient kernel has no kernel for it);
3. flash-attn absent, outside >=2.6,<2.9, fp32, a GPU it does not run on (sm8x/sm90 before 2.7.3, sm80+
   after), or head_dim not a multiple of 8 up to 256 -> ``efficient``;
4. an explicit mask (flash-attn takes no additive bias) -> ``efficient``;
5. causal with Sq != Sk (flash-attn aligns causal bottom-right, the contract top-left) -> ``efficient``;
6. otherwise -> ``flash``.

A fallback caused by the installation (version, GPU, head_dim, dtype) is logged once per reason; the
per-block ones (mask, causal shape) are how Λ-mask tiles and ring steps normally run and stay quiet.

aten's efficient kernel is called with keyword arguments only. The names are those of the schemas of
``_efficient_attention_forward/_backward`` in every torch this package allows (>=2.6,<2.15; their last
change, adding ``window_size``, predates 2.6, and the tests bind each call to the installed schema):
``(query, key, value, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
custom_mask_type, compute_log_sumexp, *, scale, ...)`` and ``(grad_out_, query, key, value, bias, out,
cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, logsumexp, dropout_p, philox_seed,
philox_offset, custom_mask_type, bias_requires_grad, *, scale, ...)``. Its layout rules (aligned bias,
padded lse, dense out) and the copy-free GQA fold live in ``attn_layout.py``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch

from .kernel_layout import fold_rows, pack_bias, pad_lse, unfold_lse, unfold_rows
from .flash import SUPPORTED, FlashAttn, flash_family, flash_runs_on, load_flash
from .kernels import MathKernel, _expand_kv, _fold_kv, attended, surrogate_out

log = logging.getLogger(__name__)

CudaPath = Literal["flash", "efficient", "math"]
_NO_MASK, _TOP_LEFT = 0, 1  # aten's custom_mask_type: none, causal aligned top-left
_FUSED = (torch.float16, torch.bfloat16, torch.float32)
_NEG_INF = float("-inf")
_warned: set[str] = set()


@dataclass(frozen=True, slots=True)
class CudaRoute:
    path: CudaPath
    """Backend that runs the block."""
    why: str = ""
    """Why a faster path was not taken ("" when flash-attn runs)."""
    warn: bool = False
    """Whether ``why`` is a property of the installation worth one log line (not of the block)."""


def choose_cuda_path(
    *,
    dtype: torch.dtype,
    head_dim: int,
    sq: int,
    sk: int,
    causal: bool,
    masked: bool,
    flash_version: str | None,
    capability: tuple[int, int],
) -> CudaRoute:
    """The backend for one block (table in the module docstring). Pure; no CUDA needed."""
    sm = f"sm{capability[0]}{capability[1]}"
    if dtype not in _FUSED:
        return CudaRoute("math", f"{dtype} has no fused attention kernel", warn=True)
    if capability < (5, 0) or (dtype == torch.bfloat16 and capability < (8, 0)):
        return CudaRoute("math", f"aten's efficient kernel has no {dtype} kernel for {sm}", warn=True)
    if flash_version is None:
        return CudaRoute("efficient", "flash-attn is not installed")
    if flash_family(flash_version) is None:
        lo, hi = (".".join(map(str, v)) for v in SUPPORTED)
        return CudaRoute("efficient", f"flash-attn {flash_version} is outside the supported >={lo},<{hi}", warn=True)
    if dtype == torch.float32:
        return CudaRoute("efficient", "flash-attn has no float32 kernel")
    if not flash_runs_on(flash_version, capability):
        return CudaRoute("efficient", f"flash-attn {flash_version} does not run on {sm} (sm80+; before 2.7.3 sm8x/sm90)", warn=True)
    if head_dim % 8 or head_dim > 256:
        return CudaRoute("efficient", f"flash-attn needs head_dim a multiple of 8 up to 256, got {head_dim}", warn=True)
    if masked:
        return CudaRoute("efficient", "an explicit mask (flash-attn takes no additive bias)")
    if causal and sq != sk:
        return CudaRoute("efficient", f"causal with Sq={sq} != Sk={sk} (flash-attn aligns it bottom-right)")
    return CudaRoute("flash")


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _warn_once(route: CudaRoute) -> None:
    if route.warn and route.why not in _warned:
        _warned.add(route.why)
        log.warning("ringrt cuda kernel: %s; using the %s path", route.why, route.path)


def _empty_rows(mask: torch.Tensor, *, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B|1, H|1, Sq) bool: rows that see no key under ``causal`` and ``mask`` as the kernel gets it (in
    ``dtype``). From the mask, not from the kernel's lse: a row that sees keys but has a non-finite lse
    held a NaN and must stay NaN (``kernels.py``). No host sync (the CPU kernel's check
    ``bool(empty.any())`` would stall the stream on every masked block)."""
    return ~attended(causal, mask.to(dtype), mask.shape[-2], mask.shape[-1], mask.device).any(-1)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class CudaKernel:
    """CUDA block kernel: flash-attn when installed and able, else aten's efficient kernel, else math.

    ``flash``: ``"auto"`` (import the installed ``flash_attn`` if any), ``None`` (never use it), or a
    package module (tests inject a CPU stand-in). ``capability``: (major, minor) to assume instead of
    asking the device; with both injected the kernel also runs on ``meta`` tensors (every aten call is
    then shape-checked against the real op schemas) and, for the flash path, on CPU tensors.
    Device checks stay in :func:`ringrt.ops.kernels.get_kernel`.
    """

    name = "cuda"

    def __init__(self, *, flash: ModuleType | None | Literal["auto"] = "auto", capability: tuple[int, int] | None = None):
        package = load_flash() if flash == "auto" else flash
        self._flash_version: str | None = None if package is None else getattr(package, "__version__", "unknown")
        self._flash = FlashAttn(package) if flash_family(self._flash_version) is not None else None
        self._capability = capability
        self._math = MathKernel()

    def route(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool, mask: torch.Tensor | None) -> CudaRoute:
        if self._capability is not None:
            cap = self._capability
        elif q.device.type == "cuda":
            cap = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
        else:
            raise ValueError(f"CudaKernel: tensors on {q.device} need capability=(major, minor) to be given")
        r = choose_cuda_path(dtype=q.dtype, head_dim=q.shape[-1], sq=q.shape[2], sk=k.shape[2], causal=causal,
                             masked=mask is not None, flash_version=self._flash_version, capability=cap)
        _warn_once(r)
        return r

    def forward(self, q, k, v, *, causal, mask, scale):
        path = self.route(q, k, causal=causal, mask=mask).path
        if path == "math":
            return self._math.forward(q, k, v, causal=causal, mask=mask, scale=scale)
        if path == "flash":
            return self._flash.forward(q, k, v, causal=causal, scale=scale)
        return _efficient_forward(q, k, v, causal=causal, mask=mask, scale=scale)

    def backward(self, dout, q, k, v, lse, delta, *, causal, mask, scale, out=None):
        path = self.route(q, k, causal=causal, mask=mask).path
        if path == "math":
            return self._math.backward(dout, q, k, v, lse, delta, causal=causal, mask=mask, scale=scale, out=out)
        if path == "flash":
            out = surrogate_out(dout, delta) if out is None else out
            return self._flash.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
        return _efficient_backward(dout, q, k, v, lse, delta, causal=causal, mask=mask, scale=scale, out=out)


def _operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(heads the kernel sees, q (B, g*Sq, heads, D), k/v (B, Sk, heads, D)).

    Non-causal GQA folds the query group into the rows (K/V as they are); causal blocks cannot (the
    causal mask follows the row index), so there K/V are repeated to H heads — the only copy left."""
    h, kvh = q.shape[1], k.shape[1]
    if causal and h != kvh:
        k, v, kvh = _expand_kv(k, h), _expand_kv(v, h), h
    qf = _unit_last(fold_rows(q, kvh))
    return kvh, qf, _unit_last(k.transpose(1, 2)), _unit_last(v.transpose(1, 2))


def _efficient_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, mask: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, h = q.shape[:2]
    heads, qf, kt, vt = _operands(q, k, v, causal)
    bias = None if mask is None else pack_bias(mask, batch=b, heads=heads, group=h // heads, dtype=q.dtype)
    out, lse, *_ = torch.ops.aten._efficient_attention_forward(
        query=qf, key=kt, value=vt, bias=bias, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
        max_seqlen_k=None, dropout_p=0.0, custom_mask_type=_TOP_LEFT if causal else _NO_MASK,
        compute_log_sumexp=True, scale=scale,
    )  # out (B, g*Sq, heads, D), lse (B, heads, ceil32(g*Sq)) fp32
    out, lse = unfold_rows(out, h), unfold_lse(lse[..., : qf.shape[1]], h)
    # a non-finite lse on a row that sees keys means a NaN in it (kernels.py): NaN, whatever the kernel wrote
    lse = torch.where(torch.isfinite(lse), lse, float("nan"))
    if mask is not None:  # rows that saw no key: lse = -inf, out = 0 (the kernel may leave NaN there)
        empty = _empty_rows(mask, causal=causal, dtype=q.dtype)
        out, lse = out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, _NEG_INF)
    return out, lse


def _efficient_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                        delta: torch.Tensor, *, causal: bool, mask: torch.Tensor | None, scale: float,
                        out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h = q.shape[:2]
    kvh, sk = k.shape[1], k.shape[2]
    heads, qf, kt, vt = _operands(q, k, v, causal)
    group = h // heads
    dof = fold_rows(dout.to(q.dtype), heads).contiguous()  # the kernel copies grad_out to dense anyway
    if out is None:  # built straight in the dense (B, g*Sq, heads, D) layout the kernel reads
        outf = surrogate_out(dof, fold_rows(delta.unsqueeze(-1), heads).squeeze(-1)).contiguous()
    else:
        outf = fold_rows(out.to(q.dtype), heads).contiguous()  # row stride heads*D is implied by the kernel
    bias = None if mask is None else pack_bias(mask, batch=b, heads=heads, group=group, dtype=q.dtype)
    seed = torch.empty((), dtype=torch.int64, device=q.device)  # unread: dropout_p = 0
    dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
        grad_out_=dof, query=qf, key=kt, value=vt, bias=bias, out=outf, cu_seqlens_q=None, cu_seqlens_k=None,
        max_seqlen_q=qf.shape[1], max_seqlen_k=sk, logsumexp=pad_lse(lse, heads=heads, group=group),
        dropout_p=0.0, philox_seed=seed, philox_offset=seed, custom_mask_type=_TOP_LEFT if causal else _NO_MASK,
        bias_requires_grad=False, scale=scale,
    )  # dq (B, g*Sq, heads, D), dk/dv (B, Sk, heads, D)
    dk, dv = dk.transpose(1, 2), dv.transpose(1, 2)  # (B, heads, Sk, D)
    if heads != kvh:  # K/V were repeated: sum each group's copies in fp32
        dk, dv = (_fold_kv(x.float(), kvh).to(k.dtype) for x in (dk, dv))
    return unfold_rows(dq, h), dk, dv
