"""flash-attn 2.x behind ringrt's block-kernel contract (see ``kernels.py``). Imported only for CUDA.

Two calling conventions of ``flash_attn.flash_attn_interface._flash_attn_forward/_backward`` exist in
the supported range (read from the tagged sources, v2.6.0 .. v2.8.3.post1):

* 2.6.x: ``window_size=(left, right)``; forward -> (out, q, k, v, out_padded, softmax_lse, S_dmask,
  rng_state); backward fills the given dq/dk/dv and returns (dq, dk, dv, softmax_d).
* 2.7.x, 2.8.x: ``window_size_left=``, ``window_size_right=``; forward -> (out, softmax_lse, S_dmask,
  rng_state); backward fills the given dq/dk/dv and returns softmax_d.

Every other argument keeps its name across both; tensors go positionally, the rest by keyword.
2.5.x (no ``softcap``) and anything from 2.9 on (FlashAttention-3/-4 ship other interfaces) are outside
the range, so they fall back to aten's efficient kernel.

Both take (B, S, H, D) tensors whose last stride is 1 (nothing else is required: the transposes of
(B, H, S, D) tensors are passed as they are), fp16/bf16, head_dim a multiple of 8 up to 256, sm8x/sm90 (any sm80+ from 2.7.3),
K/V with fewer heads than Q (GQA) natively. Two semantics differ from ringrt's contract and are fixed
here or avoided by the router (``kernels_cuda.choose_cuda_path``):

* a row that sees no key gets lse = +inf and out = 0 (ours: lse = -inf), and the backward wants +inf;
  so does a row whose softmax sum is NaN (``sum != sum`` in its epilogue), i.e. a row that attends a
  NaN: ours is NaN there (``kernels.py``), told apart by the mask's structure, not by the result;
* ``causal=True`` with Sq != Sk is aligned BOTTOM-RIGHT (query i sees keys <= i + Sk - Sq); ours is
  top-left, so flash is only asked for causal blocks with Sq == Sk, where both agree.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import re
from types import ModuleType
from typing import Literal

import torch

log = logging.getLogger(__name__)

FlashFamily = Literal["2.6", "2.7"]
SUPPORTED = ((2, 6), (2, 9))  # [2.6.0, 2.9.0): the two families above (verified 2.6.0 .. 2.8.3.post1, main's 2.8.4)
_INF = float("inf")


def _version(version: str | None) -> tuple[int, int, int] | None:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    return None if m is None else (int(m[1]), int(m[2]), int(m[3] or 0))


def flash_family(version: str | None) -> FlashFamily | None:
    """Calling convention of a flash-attn ``__version__`` ("2.6.3" -> "2.6", "2.7.4.post1" / "2.8.3" ->
    "2.7"), or None when it is outside the supported range ("2.5.9", "3.0.0b1", unparsable)."""
    v = _version(version)
    if v is None or not SUPPORTED[0] <= v[:2] < SUPPORTED[1]:
        return None
    return "2.6" if v[:2] == (2, 6) else "2.7"


def flash_runs_on(version: str, capability: tuple[int, int]) -> bool:
    """flash-attn's own device check: sm8x or sm90 only before 2.7.3, any sm80 or newer from 2.7.3."""
    v = _version(version) or (0, 0, 0)
    if v < (2, 7, 3):
        return capability[0] == 8 or capability == (9, 0)
    return capability >= (8, 0)


@functools.cache
def load_flash() -> ModuleType | None:
    """The installed ``flash_attn`` package, or None when it is absent or does not import."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return importlib.import_module("flash_attn")
    except Exception as e:  # a broken CUDA extension must not take the efficient path down with it
        log.warning("flash-attn is installed but does not import (%s); using aten's efficient kernel", e)
        return None


class FlashAttn:
    """``forward``/``backward`` of ringrt's contract on top of one flash-attn package (any module with
    ``__version__`` and a ``flash_attn_interface`` submodule, e.g. a CPU stand-in in tests)."""

    def __init__(self, package: ModuleType) -> None:
        self.version: str = getattr(package, "__version__", "unknown")
        family = flash_family(self.version)
        if family is None:
            lo, hi = (".".join(map(str, v)) for v in SUPPORTED)
            raise ValueError(f"flash-attn {self.version} is not supported; valid: >={lo},<{hi}")
        self.family: FlashFamily = family
        self._fa = importlib.import_module(f"{package.__name__}.flash_attn_interface")

    def _window(self) -> dict:
        return {"window_size": (-1, -1)} if self.family == "2.6" else {"window_size_left": -1, "window_size_right": -1}

    def forward(self, q, k, v, *, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, Sq, D), k/v (B, H_kv, Sk, D) -> out (B, H, Sq, D) q.dtype, lse (B, H, Sq) fp32."""
        res = self._fa._flash_attn_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, S, H, D) views
            dropout_p=0.0, softmax_scale=scale, causal=causal, **self._window(), softcap=0.0,
            alibi_slopes=None, return_softmax=False,
        )
        out, lse = (res[0], res[5]) if self.family == "2.6" else (res[0], res[1])  # (B, Sq, H, D), (B, H, Sq)
        # lse = +inf: a row that saw no key (its out row is already 0) or a NaN row. No mask reaches
        # flash, so the empty rows are known from the shapes: causal (bottom-right) hides every key from
        # the first Sq - Sk rows, and no row sees a key when Sk = 0. No host sync.
        sq, sk = q.shape[2], k.shape[2]
        empty = max(0, sq - sk) if causal else (sq if sk == 0 else 0)
        lse = lse.masked_fill(torch.isposinf(lse), float("nan"))
        if empty:
            lse[..., :empty] = -_INF
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, *, causal: bool, scale: float):
        """Gradients of one block from the FINAL out rows (or a surrogate) and lse (B, H, Sq)."""
        b, h, sq, d = q.shape
        kvh, sk = k.shape[1], k.shape[2]
        dq = q.new_empty(b, sq, h, d)
        dk, dv = k.new_empty(b, sk, kvh, d), v.new_empty(b, sk, kvh, d)
        # flash reads the lse as a dense (B, H, Sq) fp32 array; +inf makes an empty row contribute nothing
        lse_in = lse.float().masked_fill(torch.isneginf(lse), _INF).contiguous()
        self._fa._flash_attn_backward(
            dout.to(q.dtype).transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            out.to(q.dtype).transpose(1, 2), lse_in, dq, dk, dv,
            dropout_p=0.0, softmax_scale=scale, causal=causal, **self._window(), softcap=0.0,
            alibi_slopes=None, deterministic=False, rng_state=None,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
