"""``ringrt bench decode`` and the caches it times: the full cache is causal attention, the Λ cache
decodes the full-sequence Λ formula, and a tiny run writes its JSON."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from ringrt.lm_infinite import LambdaMask
from ringrt.model.config import ModelConfig
from ringrt.model.kvcache import FullKVCache, LambdaPrefillCache
from ringrt.model.llama import Llama
from tests.test_lambda_reference import lambda_reference


def _causal(q, k, v):
    g = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)
    return y.transpose(1, 2)


@pytest.mark.timeout(60)
def test_full_cache_equals_causal_attention():
    """A prompt chunk, then single tokens and another chunk: the rows of plain causal attention (fp64)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 23, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 23, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ref = _causal(q, k, v)
    cache = FullKVCache(n_layers=2, capacity=23)
    outs, start = [], 0
    for c in (9, 1, 1, 5, 1, 6):
        sl = slice(start, start + c)
        outs.append(cache(q[:, sl], k[:, sl], v[:, sl], layer=1, positions=torch.arange(start, start + c)))
        start += c
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=1e-12)
    assert cache.length == [0, 23]
    with pytest.raises(ValueError, match="exceed capacity=23"):
        cache.load(1, k[:, :1], v[:, :1])


@pytest.mark.timeout(60)
def test_full_cache_decoding_equals_the_model_without_cache():
    torch.manual_seed(0)
    model = Llama(ModelConfig(dim=32, n_layers=2)).double().eval()
    x = torch.randint(0, 259, (2, 12))
    cache = FullKVCache(n_layers=2, capacity=12)
    with torch.no_grad():
        ref = model(x)
        got = [model(x[:, :7], attend=cache)]
        got += [model(x[:, i : i + 1], positions=torch.tensor([i]), attend=cache) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat(got, 1), ref, rtol=0, atol=1e-10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ng,nl,lim", [(3, 5, None), (0, 4, None), (2, 6, 9)])
def test_lambda_cache_loaded_then_decoded_equals_the_full_sequence_formula(ng, nl, lim):
    """LambdaPrefillCache (one rank) loads the kept rows, as after a prefill, then decodes token by
    token past the window and the ring's wrap: each output is the Λ formula's row (fp64)."""
    g = torch.Generator().manual_seed(ng + nl)
    n, p = 40, 17
    q = torch.randn(1, n, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, n, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = LambdaMask(n_global=ng, n_local=nl, limit_distance=lim)
    ref = lambda_reference(q, k, v, n_global=ng, n_local=nl, limit=lim)
    cache = LambdaPrefillCache(n_layers=1, prefill_attend=None, mask=mask, rope_theta=10000.0, real_len=p)
    cache.caches[0].load(k[:, cache.keep], v[:, cache.keep], cache.keep, p)
    cache.advance()
    outs = [cache(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], layer=0, positions=torch.tensor([i])) for i in range(p, n)]
    torch.testing.assert_close(torch.cat(outs, 1), ref[:, p:], rtol=0, atol=1e-12)
    assert len(cache.caches[0]) == min(ng, n) + nl


@pytest.mark.timeout(120)
def test_tiny_bench_decode_writes_its_json(tmp_path, capsys):
    from ringrt.bench import decode

    p = argparse.ArgumentParser()
    decode.add_arguments(p)
    out = tmp_path / "decode.json"
    args = p.parse_args(["--contexts", "64", "256", "--new-tokens", "3", "--warmup", "1", "--reps", "1", "--n-local", "32",
                         "--with-sharded", "--out", str(out)])
    assert decode.main(args) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "decode" and res["config"]["n_local"] == 32
    assert [r["context"] for r in res["rows"]] == [64, 256]
    for r in res["rows"]:
        for key in ("full_tok_s", "lambda_tok_s", "sharded_tok_s", "ratio", "best_ratio", "cpu_ratio", "lambda_best_tok_s"):
            assert r[key] > 0, key
        assert r["ratio"] == pytest.approx(r["lambda_tok_s"] / r["full_tok_s"])
    assert set(res["checks"]) >= {"lambda_tok_s_max_over_min", "lambda_cpu_tok_s_max_over_min"}
    assert "context" in capsys.readouterr().out
