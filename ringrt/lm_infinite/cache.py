"""Decode-time K/V cache for Λ-mask attention: memory bounded by n_global + n_local tokens.

A Λ-mask query never looks at a key that is neither among the first n_global tokens nor among the
last n_local ones, so generation can drop everything else and still compute exactly what the
full-sequence formula computes (``mask.py``). Keys are stored pre-RoPE: the global branch needs
them unrotated, the local branch rotates them to their positions at use.
"""

from __future__ import annotations

import math

import torch

from ..ops.kernel_layout import aligned_zeros
from ..ops.kernels import get_kernel
from ..ops.merge import empty_accumulator, merge_
from ..ops.rope import apply_rope
from .attention import rope_cos_sin
from .mask import LambdaMask, stationary_positions

_NEG_INF = float("-inf")


class LambdaKVCache:
    """K/V of the first ``mask.n_global`` and the last ``mask.n_local`` tokens of one layer.

    Usage, one layer, prompt then tokens one at a time (or a few at a time)::

        cache = LambdaKVCache(mask=LambdaMask(n_global=16, n_local=4096), rope_theta=cfg.rope_theta)
        out = cache.attend(q, k, v)      # q (B, T, H, D), k/v (B, T, H_kv, D) pre-RoPE, next T tokens

    ``append`` stores a prefilled prompt's k/v. ``attend`` appends k/v as tokens ``seen .. seen + T - 1``
    (or the given ``positions``), computes the
    Λ-mask attention of the T queries over everything kept plus the new tokens, then drops the
    tokens no later query can see. ``out`` equals rows seen .. seen + T - 1 of ``lambda_attention``
    over the whole sequence.
    """

    def __init__(self, *, mask: LambdaMask, rope_theta: float = 10000.0, softmax_scale: float | None = None,
                 position_offset: int = 0, kernel: str = "auto"):
        p = mask.problem() if isinstance(mask, LambdaMask) else f"mask must be a ringrt.LambdaMask, got {type(mask).__name__}"
        if p:
            raise ValueError(f"LambdaKVCache: {p}")
        self.mask, self.rope_theta, self.softmax_scale = mask, float(rope_theta), softmax_scale
        self.position_offset, self.kernel = position_offset, kernel
        self.k: torch.Tensor | None = None  # (B, n, H_kv, D) pre-RoPE
        self.v: torch.Tensor | None = None  # (B, n, H_kv, D)
        self.index = torch.empty(0, dtype=torch.long)  # (n,) token index of each kept row, increasing
        self.seen = 0  # tokens appended so far

    def __len__(self) -> int:
        return int(self.index.numel())

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Store the next T tokens' pre-RoPE k/v (B, T, H_kv, D) without attending (e.g. a prompt that
        was prefilled with ``lambda_attention``), keeping only what later queries can see."""
        self._add(k, v, positions)
        self._trim()

    def load(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, seen: int) -> None:
        """Start the cache from an already-selected set of tokens: k/v (B, n, H_kv, D) pre-RoPE of the
        token indices ``index`` (n,), increasing, out of a prompt of ``seen`` tokens. It must hold every
        token a later query can see: all of ``0 .. n_global-1`` and ``seen-n_local .. seen-1`` (clipped)."""
        if self.seen:
            raise ValueError(f"LambdaKVCache.load: the cache already holds {self.seen} tokens")
        need = torch.cat([torch.arange(min(self.mask.n_global, seen)), torch.arange(max(0, seen - self.mask.n_local), seen)]).unique()
        idx = index.to(torch.long).cpu()
        if k.shape != v.shape or k.shape[1] != idx.numel() or not torch.isin(need, idx).all() or bool((idx[1:] <= idx[:-1]).any()):
            raise ValueError(f"LambdaKVCache.load: k {tuple(k.shape)}, v {tuple(v.shape)} and index (n={idx.numel()}) must "
                             f"describe increasing token indices covering the first {self.mask.n_global} and last "
                             f"{self.mask.n_local} of {seen} tokens")
        self.k, self.v, self.index, self.seen = k, v, idx.to(k.device), int(seen)
        self._trim()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Append the next T tokens' k/v and return their queries' attention (B, T, H, D), dtype of q.

        q (B, T, H, D), k/v (B, T, H_kv, D) pre-RoPE. positions: (T,) or (B, T) token indices of the new
        tokens; they must be seen, seen + 1, ... (the default).
        """
        new_index = self._add(k, v, positions)
        out = self._attention(q, new_index)
        self._trim()
        return out

    def _add(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        t = k.shape[1]
        new_index = torch.arange(self.seen, self.seen + t, device=k.device)
        if positions is not None:
            rows = positions.reshape(-1, positions.shape[-1]).to(new_index)
            if rows.shape[-1] != t or not bool((rows == new_index).all()):
                raise ValueError(f"LambdaKVCache: positions={positions.tolist()} must continue the cache: "
                                 f"{self.seen} .. {self.seen + t - 1}")
        if v.shape != k.shape or (self.k is not None and (k.shape[0], *k.shape[2:]) != (self.k.shape[0], *self.k.shape[2:])):
            raise ValueError(f"LambdaKVCache: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B, T, H_kv, D) "
                             f"like the cached {None if self.k is None else tuple(self.k.shape)}")
        self.k = k if self.k is None else torch.cat([self.k, k], 1)
        self.v = v if self.v is None else torch.cat([self.v, v], 1)
        self.index = torch.cat([self.index.to(k.device), new_index])
        self.seen += t
        return new_index

    def _trim(self) -> None:
        keep = (self.index < self.mask.n_global) | (self.index >= self.seen - self.mask.n_local)
        if not bool(keep.all()):
            self.k, self.v, self.index = self.k[:, keep], self.v[:, keep], self.index[keep]

    def _attention(self, q: torch.Tensor, qi: torch.Tensor) -> torch.Tensor:
        m, d = self.mask, q.shape[-1]
        kern = get_kernel(q.device, self.kernel)
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(d)
        ki = self.index
        cos, sin = rope_cos_sin(qi + self.position_offset, d, self.rope_theta, q.dtype)
        qr = apply_rope(q, cos, sin).transpose(1, 2)  # (B, H, T, D)
        cos, sin = rope_cos_sin(ki + self.position_offset, d, self.rope_theta, q.dtype)
        kr = apply_rope(self.k, cos, sin).transpose(1, 2)  # (B, H_kv, n, D)
        cos, sin = rope_cos_sin(stationary_positions(qi, m), d, self.rope_theta, q.dtype)
        qs = apply_rope(q, cos, sin).transpose(1, 2)
        kraw, v = self.k.transpose(1, 2), self.v.transpose(1, 2)
        dist = qi.unsqueeze(1) - ki  # (T, n) i - j
        local = (dist >= 0) & (dist < m.n_local)
        far = (ki < m.n_global) & (dist >= m.n_local)
        acc_o, acc_l = empty_accumulator(qr)
        for qq, kk, keep in ((qr, kr, local), (qs, kraw, far)):
            if bool(keep.any()):
                # rows padded to 16 bytes: aten's CUDA kernel takes the bias as it is, with no aligned copy
                bias = aligned_zeros(tuple(keep.shape), q.dtype, q.device).masked_fill_(~keep, _NEG_INF)  # (T, n)
                o, l = kern.forward(qq, kk, v, causal=False, mask=bias, scale=scale)
                merge_(acc_o, acc_l, o, l)
        return acc_o.to(q.dtype).transpose(1, 2)  # (B, T, H, D)
