"""Decode-time K/V cache for Λ-mask attention: memory bounded by n_global + n_local tokens.

A Λ-mask query never looks at a key that is neither among the first n_global tokens nor among the
last n_local ones, so generation can drop everything else and still compute exactly what the
full-sequence formula computes (``mask.py``). The global tokens' keys are stored pre-RoPE (the
global branch needs them unrotated); the window's keys are rotated to their positions once, when
they enter a ring buffer, so a decode step rotates only its own query and key.
"""

from __future__ import annotations

import math

import torch

from ..ops.cached_attention import softmax_over_parts
from ..ops.merge import acc_dtype
from ..ops.rope import apply_rope, inv_freq
from .attention import freq_cos_sin
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

    Storage, preallocated at the first call (nothing is concatenated or re-rotated per step)::

        global  (B, H_kv, n_global, D)  k pre-RoPE and v of tokens 0 .. n_global-1 (row j = token j)
        local   (B, H_kv, n_local, D)   a ring: token j at row j % n_local, k rotated to position j

    A key is rotated once, when it enters the ring. A single decoded token (T = 1) then attends to
    the whole ring (exactly its local branch) and to the global rows its global branch sees (a
    prefix), with no mask: two matmuls for the scores, one softmax over both, two for the output.
    """

    def __init__(self, *, mask: LambdaMask, rope_theta: float = 10000.0, softmax_scale: float | None = None,
                 position_offset: int = 0):
        p = mask.problem() if isinstance(mask, LambdaMask) else f"mask must be a ringrt.LambdaMask, got {type(mask).__name__}"
        if p:
            raise ValueError(f"LambdaKVCache: {p}")
        self.mask, self.rope_theta, self.softmax_scale = mask, float(rope_theta), softmax_scale
        self.position_offset = position_offset  # the math is plain matmuls on the inputs' device: no block kernel
        self._gk: torch.Tensor | None = None  # (B, H_kv, n_global, D) pre-RoPE
        self._gv: torch.Tensor | None = None  # (B, H_kv, n_global, D)
        self._lk: torch.Tensor | None = None  # (B, H_kv, n_local, D) rotated, ring
        self._lv: torch.Tensor | None = None  # (B, H_kv, n_local, D) ring
        self._freqs: torch.Tensor | None = None  # (D/2,) RoPE frequencies
        self._stationary: tuple | None = None  # (position, cos, sin) of the last global-branch query rotation
        self.seen = 0  # tokens appended so far
        self._local_from = 0  # the window holds no token before this one (``skip_to``)

    @property
    def index(self) -> torch.Tensor:
        """(n,) token indices of the kept rows, increasing: the first n_global and the last n_local."""
        g = min(self.mask.n_global, self.seen)
        return torch.cat([torch.arange(g), torch.arange(self._window_start(g), self.seen)])

    def __len__(self) -> int:
        g = min(self.mask.n_global, self.seen)
        return g + self.seen - self._window_start(g)

    def _window_start(self, g: int) -> int:
        return max(g, self.seen - self.mask.n_local, self._local_from)

    def skip_to(self, seen: int) -> None:
        """Forget the local window and continue at token ``seen`` (>= the tokens seen so far), as if
        the tokens in between had been seen and dropped; the global tokens stay. The next n_local
        tokens' queries then miss keys the full sequence would show them: what a caller that starts
        mid-text must warm up over. Needs the global tokens first (seen >= n_global, or no skip)."""
        if seen < self.seen:
            raise ValueError(f"LambdaKVCache.skip_to({seen}): the cache has already seen {self.seen} tokens")
        if seen > self.seen and self.seen < self.mask.n_global:
            raise ValueError(f"LambdaKVCache.skip_to({seen}): only {self.seen} of the {self.mask.n_global} global "
                             f"tokens were seen; stream them before skipping")
        if seen > self.seen:
            self.seen = self._local_from = int(seen)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Store the next T tokens' pre-RoPE k/v (B, T, H_kv, D) without attending (e.g. a prompt that
        was prefilled with ``lambda_attention``), keeping only what later queries can see."""
        self._check(k, v, positions)
        self._store_global(k, v, self.seen)
        self._store_local(k, v, self.seen)
        self.seen += k.shape[1]

    def load(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, seen: int) -> None:
        """Start the cache from an already-selected set of tokens: k/v (B, n, H_kv, D) pre-RoPE of the
        token indices ``index`` (n,), increasing, out of a prompt of ``seen`` tokens. It must hold every
        token a later query can see: all of ``0 .. n_global-1`` and ``seen-n_local .. seen-1`` (clipped)."""
        if self.seen:
            raise ValueError(f"LambdaKVCache.load: the cache already holds {self.seen} tokens")
        m = self.mask
        need = torch.cat([torch.arange(min(m.n_global, seen)), torch.arange(max(0, seen - m.n_local), seen)]).unique()
        idx = index.to(torch.long).cpu()
        if (k.shape != v.shape or k.shape[1] != idx.numel() or not torch.isin(need, idx).all() or bool((idx[1:] <= idx[:-1]).any())
                or bool((idx >= seen).any())):
            raise ValueError(f"LambdaKVCache.load: k {tuple(k.shape)}, v {tuple(v.shape)} and index (n={idx.numel()}) must "
                             f"describe increasing token indices covering the first {m.n_global} and last "
                             f"{m.n_local} of {seen} tokens")
        self._check(k, v, None)  # allocates the buffers
        # increasing and covering: the global tokens are the first rows, the window the last ones
        n_g, lo = min(m.n_global, seen), max(0, seen - m.n_local)
        self._store_global(k[:, :n_g], v[:, :n_g], 0)
        n_l = seen - lo
        self._store_local(k[:, k.shape[1] - n_l:], v[:, k.shape[1] - n_l:], lo)
        self.seen = int(seen)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Append the next T tokens' k/v and return their queries' attention (B, T, H, D), dtype of q.

        q (B, T, H, D), k/v (B, T, H_kv, D) pre-RoPE. positions: (T,) or (B, T) token indices of the new
        tokens; they must be seen, seen + 1, ... (the default).
        """
        self._check(k, v, positions)
        s, t = self.seen, k.shape[1]
        self._store_global(k, v, s)
        if t == 1 and s + 1 - self._local_from >= min(s + 1, self.mask.n_local):
            # decode: the ring after the write is exactly the local branch (no forgotten row in it)
            cos, sin = freq_cos_sin(torch.tensor([s + self.position_offset], device=k.device), self._freqs, q.dtype)
            self._write_ring(apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2), s)  # k, q share one rotation
            self.seen += 1
            return self._attend_one(apply_rope(q, cos, sin), q)
        out = self._attend_chunk(q, k, v)
        self._store_local(k, v, s)
        self.seen += t
        return out

    # -- storage -----------------------------------------------------------------------------------

    def _check(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None) -> None:
        t = k.shape[1]
        if positions is not None:
            rows = positions.reshape(-1, positions.shape[-1])
            want = torch.arange(self.seen, self.seen + t, device=rows.device)
            if rows.shape[-1] != t or not bool((rows == want).all()):
                raise ValueError(f"LambdaKVCache: positions={positions.tolist()} must continue the cache: "
                                 f"{self.seen} .. {self.seen + t - 1}")
        have = self._lk
        if v.shape != k.shape or (have is not None and (k.shape[0], k.shape[2], k.shape[3]) != (have.shape[0], have.shape[1], have.shape[3])):
            cached = None if have is None else (have.shape[0], len(self), have.shape[1], have.shape[3])
            raise ValueError(f"LambdaKVCache: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B, T, H_kv, D) "
                             f"like the cached {cached}")
        if have is None:
            b, _, h, d = k.shape
            self._gk, self._gv = (k.new_zeros(b, h, self.mask.n_global, d) for _ in range(2))
            self._lk, self._lv = (k.new_zeros(b, h, self.mask.n_local, d) for _ in range(2))
            self._freqs = inv_freq(d, self.rope_theta, k.device)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = freq_cos_sin(positions, self._freqs, x.dtype)
        return apply_rope(x, cos, sin)

    def _store_global(self, k: torch.Tensor, v: torch.Tensor, first: int) -> None:
        """Rows of tokens first .. first + T - 1 that are global (index < n_global), pre-RoPE."""
        end = min(self.mask.n_global, first + k.shape[1])
        if end > first:
            self._gk[:, :, first:end] = k[:, : end - first].transpose(1, 2)
            self._gv[:, :, first:end] = v[:, : end - first].transpose(1, 2)

    def _store_local(self, k: torch.Tensor, v: torch.Tensor, first: int) -> None:
        """Tokens first .. first + T - 1 into the ring (only the last n_local of them matter), k rotated."""
        nl, t = self.mask.n_local, k.shape[1]
        skip = max(0, t - nl)
        a = first + skip  # first token written
        kr = self._rope(k[:, skip:], torch.arange(a, first + t, device=k.device) + self.position_offset)
        self._write_ring(kr.transpose(1, 2), v[:, skip:].transpose(1, 2), a)

    def _write_ring(self, kr: torch.Tensor, vr: torch.Tensor, a: int) -> None:
        """Rotated k and v (B, H_kv, n, D), n <= n_local, of tokens a .. a + n - 1 into their ring rows."""
        nl, n = self.mask.n_local, kr.shape[2]
        r = a % nl
        head = min(n, nl - r)  # rows up to the end of the ring, then the rest wraps to row 0
        self._lk[:, :, r : r + head], self._lv[:, :, r : r + head] = kr[:, :, :head], vr[:, :, :head]
        if n > head:
            self._lk[:, :, : n - head], self._lv[:, :, : n - head] = kr[:, :, head:], vr[:, :, head:]

    def _ring_index(self) -> torch.Tensor:
        """(rows,) token index held by each valid ring row (before the current call's tokens)."""
        nl, s = self.mask.n_local, self.seen
        r = torch.arange(min(s, nl))
        idx = r + (s - 1 - r).div(nl, rounding_mode="floor") * nl
        return idx.masked_fill(idx < self._local_from, -(1 << 40))  # rows forgotten by skip_to: never visible

    # -- attention ---------------------------------------------------------------------------------

    def _scale(self, d: int) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(d)

    def _attend_one(self, qr: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """One query, token i = seen - 1, after its k/v were stored: unmasked. qr: q rotated to i."""
        m, i = self.mask, self.seen - 1
        n_far = max(0, min(m.n_global, i - m.n_local + 1))  # global keys its global branch sees: 0 .. n_far-1
        parts = [(qr, self._lk[:, :, : min(self.seen, m.n_local)], self._lv)]
        if n_far:
            p = min(m.limit, i)  # the stationary position: the same for every i >= limit, so rotated once
            if self._stationary is None or self._stationary[0] != p or self._stationary[1].dtype != q.dtype:
                self._stationary = (p, *freq_cos_sin(stationary_positions(torch.tensor([i], device=q.device), m), self._freqs, q.dtype))
            parts.append((apply_rope(q, *self._stationary[1:]), self._gk[:, :, :n_far], self._gv))
        return softmax_over_parts(parts, scale=self._scale(q.shape[-1]))

    def _attend_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """T > 1 queries (tokens seen .. seen + T - 1) over the ring before their write plus themselves
        (local branch) and the global rows (global branch), with masks from the token indices."""
        m, s, t = self.mask, self.seen, q.shape[1]
        qi = torch.arange(s, s + t, device=q.device)
        ri = self._ring_index().to(q.device)
        n_ring = ri.numel()
        loc_k = torch.cat([self._lk[:, :, :n_ring], self._rope(k, qi + self.position_offset).transpose(1, 2)], 2)
        loc_v = torch.cat([self._lv[:, :, :n_ring], v.transpose(1, 2)], 2)
        dist = qi.unsqueeze(1) - torch.cat([ri, qi])  # (T, n) i - j
        keep = [(dist >= 0) & (dist < m.n_local)]
        parts = [(self._rope(q, qi + self.position_offset), loc_k, loc_v)]
        n_g = min(m.n_global, s + t)
        if n_g and s + t - 1 - m.n_local >= 0:  # some query may reach a global key through its global branch
            parts.append((self._rope(q, stationary_positions(qi, m)), self._gk[:, :, :n_g], self._gv))
            keep.append(qi.unsqueeze(1) - torch.arange(n_g, device=q.device) >= m.n_local)
        adt = acc_dtype(q.dtype)
        bias = [torch.zeros(kp.shape, dtype=adt, device=q.device).masked_fill_(~kp, _NEG_INF) for kp in keep]
        return softmax_over_parts(parts, scale=self._scale(q.shape[-1]), bias=bias)
