"""A sharded KV cache for generation: prefill shards the prompt over the ranks (ring attention)
and each rank keeps the K/V of its own prompt tokens; each decoded token's K/V is kept by one rank
(round robin). A decode step computes, on every rank, the new query's partial attention over the
local cache, all-gathers the (out, lse) partials and merges them in rank order, so every rank
ends with the same, bit-identical output.

K/V are stored after RoPE (positions are absolute), in the order the layout gave them: order does
not matter to a query that sees every cached key.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed.comm import count
from ..distributed.groups import base_group
from ..ops.cached_attention import softmax_over_parts
from ..ops.merge import acc_dtype, empty_accumulator, merge_


class ShardedKVCache:
    """Injected as the model's ``attend`` for a prefill call and then for each decode call."""

    rotates = False

    def __init__(self, *, n_layers: int, prefill_attend=None, real_len: int, group: dist.ProcessGroup | None = None):
        self.group, self.rank, self.world = base_group(group)
        self.prefill_attend = prefill_attend
        self.real_len = real_len  # prompt tokens that are real (the rest is padding for the layout)
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.decoding = False
        self.step = 0  # decoded tokens so far; token t's K/V live on rank t % world

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=1)
            self.v[layer] = torch.cat([self.v[layer], v], dim=1)

    def __call__(self, q, k, v, *, layer, positions):
        """Prefill: q/k/v (B, S_local, H|H_kv, D) -> ring attention. Decode: (B, 1, ...) -> (B, 1, H, D)."""
        if not self.decoding:
            keep = positions < self.real_len  # (S_local,) padding never enters the cache
            self._append(layer, k[:, keep], v[:, keep])
            if self.prefill_attend is None:  # one process: the model's own causal attention
                from .llama import LocalAttention

                return LocalAttention()(q, k, v, layer=layer, positions=positions)
            return self.prefill_attend(q, k, v, layer=layer, positions=positions)
        if self.step % self.world == self.rank:
            self._append(layer, k, v)
        return self._decode_attention(q, layer)

    def advance(self) -> None:
        """Call after each decode forward (the next token's K/V go to the next rank)."""
        if self.decoding:
            self.step += 1
        self.decoding = True

    def _decode_attention(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        B, _, H, D = q.shape
        qh = q.transpose(1, 2)  # (B, H, 1, D)
        out, lse = empty_accumulator(qh)  # (B, H, 1, D), (B, H, 1) fp32 (fp64 for fp64)
        k, v = self.k[layer], self.v[layer]
        if k is not None and k.shape[1] > 0:
            g = H // k.shape[2]
            kh = k.transpose(1, 2).repeat_interleave(g, dim=1).to(out.dtype)  # (B, H, S_c, D)
            vh = v.transpose(1, 2).repeat_interleave(g, dim=1).to(out.dtype)
            scores = (qh.to(out.dtype) @ kh.transpose(-1, -2)) / D**0.5  # (B, H, 1, S_c)
            lse = torch.logsumexp(scores, dim=-1)  # (B, H, 1)
            out = torch.softmax(scores, dim=-1) @ vh  # (B, H, 1, D)
        if self.world > 1:
            packed = torch.cat([out.flatten(), lse.flatten()])
            parts = [torch.empty_like(packed) for _ in range(self.world)]
            dist.all_gather(parts, packed, group=self.group)
            count("kvcache", sent=packed.numel() * packed.element_size() * (self.world - 1),
                  recv=packed.numel() * packed.element_size() * (self.world - 1), sends=self.world - 1, recvs=self.world - 1)
            n = out.numel()
            out, lse = empty_accumulator(qh)
            for p in parts:  # rank order on every rank: identical results everywhere
                merge_(out, lse, p[:n].view_as(out), p[n:].view_as(lse))
        return out.to(q.dtype).transpose(1, 2)  # (B, 1, H, D)


class LambdaPrefillCache:
    """Λ-mask generation: sharded prefill with ``ringrt.lambda_attention`` (contiguous shards),
    then decoding from one ``ringrt.LambdaKVCache`` per layer, replicated on every rank.

    A Λ-mask query sees at most n_global + n_local keys, so after the prefill the ranks assemble just
    those tokens' pre-RoPE K/V — the first n_global and the last n_local of the prompt — with one
    all_reduce of a buffer of that size (each row comes from the one rank that holds it; the others
    add zeros), load them into the cache and decode without further communication; every rank
    computes the same tokens. Memory and traffic do not grow with the prompt length.
    """

    rotates = True

    def __init__(self, *, n_layers: int, prefill_attend, mask, rope_theta: float, real_len: int,
                 group: dist.ProcessGroup | None = None):
        from ..lm_infinite import LambdaKVCache

        self.group, self.rank, self.world = base_group(group)
        self.prefill_attend, self.real_len, self.mask = prefill_attend, real_len, mask
        self.caches = [LambdaKVCache(mask=mask, rope_theta=rope_theta) for _ in range(n_layers)]
        self.decoding = False
        p = real_len  # kept token indices: first n_global and last n_local of the real prompt
        self.keep = torch.cat([torch.arange(min(mask.n_global, p)), torch.arange(max(0, p - mask.n_local), p)]).unique()
        self._keep_on: torch.Tensor | None = None  # a copy on the model's device, for indexing there

    def _kept_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, len(keep), ...) rows of the whole prompt at ``self.keep`` from contiguous shards x (B, S_l, ...)."""
        s_l = x.shape[1]
        lo = self.rank * s_l
        if self._keep_on is None or self._keep_on.device != x.device:
            self._keep_on = self.keep.to(x.device)
        keep = self._keep_on
        out = x.new_zeros(x.shape[0], keep.numel(), *x.shape[2:])
        mine = (keep >= lo) & (keep < lo + s_l)
        out[:, mine] = x[:, keep[mine] - lo]
        if self.world > 1:
            dist.all_reduce(out, group=self.group)  # exactly one rank contributes each row; x + 0 == x
        return out

    def __call__(self, q, k, v, *, layer, positions):
        if self.decoding:
            return self.caches[layer].attend(q, k, v, positions)
        out = self.prefill_attend(q, k, v, layer=layer, positions=positions)
        kv = self._kept_rows(torch.cat([k, v], dim=-1))  # one reduction for both: (B, n_keep, H_kv, 2D)
        d = k.shape[-1]
        self.caches[layer].load(kv[..., :d], kv[..., d:], self.keep, self.real_len)  # CPU index: checked without a sync
        return out

    def advance(self) -> None:
        self.decoding = True


class FullKVCache:
    """One-process full KV cache: every past token's K/V kept, in buffers preallocated for
    ``capacity`` tokens per layer (no copy of the past per step). Injected as the model's ``attend``
    (q, k rotated), for a prompt and then for each decoded token.

    Per layer: k, v (B, H_kv, capacity, D), rows 0 .. length-1 filled. A call with T new tokens writes
    them at rows length .. length+T-1 and attends causally; a decode call (T = 1) attends to every
    filled row without a mask: grouped-query scores with one matmul (no repeat of K/V over the query
    heads), a softmax, one matmul with V. The exact-causal baseline of ``ringrt bench decode``.
    """

    rotates = False

    def __init__(self, *, n_layers: int, capacity: int):
        if capacity < 1:
            raise ValueError(f"FullKVCache: capacity={capacity} must be a positive number of tokens")
        self.capacity = capacity
        self.k: list[torch.Tensor | None] = [None] * n_layers  # (B, H_kv, capacity, D)
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = [0] * n_layers

    def load(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append rotated k/v (B, T, H_kv, D) to layer ``layer`` without attending (a prefilled prompt)."""
        t, n = k.shape[1], self.length[layer]
        if n + t > self.capacity:
            raise ValueError(f"FullKVCache: {n} + {t} tokens exceed capacity={self.capacity}")
        if self.k[layer] is None:
            b, _, h, d = k.shape
            self.k[layer], self.v[layer] = (k.new_empty(b, h, self.capacity, d) for _ in range(2))
        self.k[layer][:, :, n : n + t] = k.transpose(1, 2)
        self.v[layer][:, :, n : n + t] = v.transpose(1, 2)
        self.length[layer] = n + t

    def __call__(self, q, k, v, *, layer, positions):
        """q (B, T, H, D), k/v (B, T, H_kv, D) rotated -> (B, T, H, D): causal over the cache + the T tokens."""
        t, d = q.shape[1], q.shape[-1]
        self.load(layer, k, v)
        n = self.length[layer]
        bias = None
        if t > 1:  # query n-t+a sees keys 0 .. n-t+a
            future = torch.arange(n - t, n, device=q.device).unsqueeze(1) < torch.arange(n, device=q.device)  # (T, n)
            bias = [torch.zeros(future.shape, dtype=acc_dtype(q.dtype), device=q.device).masked_fill_(future, float("-inf"))]
        return softmax_over_parts([(q, self.k[layer][:, :, :n], self.v[layer])], scale=d**-0.5, bias=bias)  # (B, T, H, D)

    def advance(self) -> None:
        """Nothing to do (the generation loop's protocol): rows are counted per layer."""
