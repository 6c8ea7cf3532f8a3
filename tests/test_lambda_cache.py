"""LambdaKVCache: decoding with n_global + n_local kept tokens gives the full-sequence formula."""

from __future__ import annotations

import pytest
import torch

from ringrt.lm_infinite import LambdaKVCache, LambdaMask
from tests.test_lambda_reference import lambda_reference


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ng,nl,lim,chunks", [
    (2, 5, None, [7, 1, 1, 3, 1, 4, 1, 2]),  # prompt, then single tokens and small chunks
    (3, 4, 9, [1] * 20),  # limit > n_local, token by token from the start
    (0, 3, None, [5, 6, 1, 8]),  # sliding window
    (4, 2, None, [3, 10, 7]),  # chunks longer than the window
])
def test_cache_matches_full_sequence_formula(ng, nl, lim, chunks):
    n = sum(chunks)
    g = torch.Generator().manual_seed(n)
    q = torch.randn(2, n, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, n, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, n, 2, 8, generator=g, dtype=torch.float64)
    mask = LambdaMask(n_global=ng, n_local=nl, limit_distance=lim)
    ref = lambda_reference(q, k, v, n_global=ng, n_local=nl, limit=lim)
    cache = LambdaKVCache(mask=mask, position_offset=5)  # RoPE offset: relative positions only
    start, outs = 0, []
    for j, c in enumerate(chunks):
        sl = slice(start, start + c)
        pos = torch.arange(start, start + c).expand(2, c) if j % 2 else None  # (B, T) position ids or implicit
        outs.append(cache.attend(q[:, sl], k[:, sl], v[:, sl], pos))
        start += c
        assert len(cache) <= ng + nl  # bounded memory
        assert cache.index.tolist() == sorted(set(range(min(ng, start))) | set(range(max(0, start - nl), start)))
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=1e-12)


@pytest.mark.timeout(30)
def test_cache_rejects_positions_that_do_not_continue():
    cache = LambdaKVCache(mask=LambdaMask(n_global=1, n_local=2))
    x = torch.randn(1, 2, 1, 4)
    cache.attend(x, x, x)
    with pytest.raises(ValueError, match="must continue the cache: 2 .. 3"):
        cache.attend(x, x, x, positions=torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="must be \\(B, T, H_kv, D\\) like the cached"):
        cache.attend(x, x, torch.randn(1, 2, 1, 6))
    with pytest.raises(ValueError, match="n_local=0"):
        LambdaKVCache(mask=LambdaMask(n_global=1, n_local=0))


@pytest.mark.timeout(30)
def test_append_then_decode_equals_attending_the_prompt():
    """Filling the cache with a prefilled prompt's k/v (no attention) and decoding from it gives the
    same outputs as attending the prompt through the cache."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 30, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = LambdaMask(n_global=3, n_local=6)
    ref = lambda_reference(q, k, v, n_global=3, n_local=6)
    cache = LambdaKVCache(mask=mask)
    cache.append(k[:, :25], v[:, :25], torch.arange(25))
    assert cache.index.tolist() == [0, 1, 2] + list(range(19, 25))
    outs = [cache.attend(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1]) for i in range(25, 30)]
    torch.testing.assert_close(torch.cat(outs, 1), ref[:, 25:], rtol=0, atol=1e-12)


def test_load_of_the_kept_rows_equals_appending_the_whole_prompt():
    """Prefill caches start from just the first n_global and last n_local tokens of the prompt."""
    g = torch.Generator().manual_seed(3)
    mask, p = LambdaMask(n_global=3, n_local=5), 17
    k, v = (torch.randn(2, p + 4, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.randn(2, 4, 4, 8, generator=g, dtype=torch.float64)
    full = LambdaKVCache(mask=mask)
    full.append(k[:, :p], v[:, :p])
    keep = torch.tensor([0, 1, 2, 12, 13, 14, 15, 16])
    part = LambdaKVCache(mask=mask)
    part.load(k[:, keep], v[:, keep], keep, p)
    a = full.attend(q, k[:, p:], v[:, p:])
    b = part.attend(q, k[:, p:], v[:, p:])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="covering the first 3 and last 5 of 17 tokens"):
        LambdaKVCache(mask=mask).load(k[:, keep[:-1]], v[:, keep[:-1]], keep[:-1], p)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_skip_to_forgets_the_window_and_later_queries_match_again(chunk):
    """After skip_to(t0) a query i sees exactly what the full sequence shows it once its window no
    longer reaches before t0 (i >= t0 + n_local - 1); earlier ones miss only the skipped keys."""
    torch.manual_seed(0)
    mask = LambdaMask(n_global=3, n_local=5, limit_distance=5)
    n, t0 = 40, 17
    q, k, v = (torch.randn(1, n, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    full = LambdaKVCache(mask=mask)
    want = torch.cat([full.attend(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1]) for i in range(n)], 1)
    c = LambdaKVCache(mask=mask)
    c.attend(q[:, :3], k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="already seen"):
        c.skip_to(2)
    c.skip_to(t0)
    assert c.index.tolist() == [0, 1, 2] and len(c) == 3
    outs = [c.attend(q[:, i : i + chunk], k[:, i : i + chunk], v[:, i : i + chunk]) for i in range(t0, n, chunk)]
    got = torch.cat(outs, 1)[:, : n - t0]
    exact = t0 + mask.n_local - 1
    assert (got[:, exact - t0 :] - want[:, exact:]).abs().max() < 1e-12
    assert (got[:, 0] - want[:, t0]).abs().max() > 1e-3  # the first query really misses its window
    assert c.index.tolist() == [0, 1, 2, *range(n - 5, n)]
    early = LambdaKVCache(mask=mask)
    early.attend(q[:, :2], k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="global tokens"):
        early.skip_to(10)
