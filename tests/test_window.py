"""``ringrt.attention(..., window=...)``: sliding windows and the Λ-mask on q/k that are already rotated.

Reference: ``ringrt.lambda_attention`` / ``sliding_window_attention`` on the same q/k before RoPE,
themselves checked against LM-Infinite's construction and a plain fp64 attention
(``test_lambda_reference.py``, ``test_lambda_attention.py``). Rotating q/k at their token indices
and calling ``attention(window=...)`` must give the same output and, through the rotation, the same
gradients (fp64, measured ~1e-16; asserted at 1e-12).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run

THETA = 10000.0
CASES = [  # (n_global, n_local, limit_distance, heads, kv_heads, algorithm)
    (0, 5, None, 4, 2, "ring"),  # plain sliding window (window=int), GQA
    (0, 5, None, 4, 4, "tokenring"),
    (2, 5, None, 4, 2, "ring"),  # Λ: global tokens re-rotated with inv_freq
    (3, 6, 4, 4, 4, "tokenring"),  # limit_distance below the window
    (2, 9, None, 2, 1, "auto"),  # window wider than a shard at W = 3
]


def _worker(rank, world, s_full):
    import ringrt
    from ringrt.lm_infinite import LambdaMask, lambda_attention
    from ringrt.lm_infinite.attention import rope_cos_sin
    from ringrt.ops.rope import apply_rope, inv_freq

    out = []
    for n_global, n_local, limit, heads, kv_heads, algorithm in CASES:
        g = torch.Generator().manual_seed(n_global * 100 + n_local)
        q = torch.randn(2, s_full, heads, 8, generator=g, dtype=torch.float64)
        k = torch.randn(2, s_full, kv_heads, 8, generator=g, dtype=torch.float64)
        v = torch.randn(2, s_full, kv_heads, 8, generator=g, dtype=torch.float64)
        dout = torch.randn(2, s_full, heads, 8, generator=g, dtype=torch.float64)
        mask = LambdaMask(n_global=n_global, n_local=n_local, limit_distance=limit)
        shard = lambda x: ringrt.shard(x, layout="contiguous").detach().requires_grad_()  # noqa: E731
        ql, kl, vl = shard(q), shard(k), shard(v)
        do = ringrt.shard(dout, layout="contiguous")
        ref_alg = "tokenring" if algorithm == "tokenring" else "ring"
        ref = lambda_attention(ql, kl, vl, mask=mask, rope_theta=THETA, algorithm=ref_alg)
        ref_grads = torch.autograd.grad(ref, (ql, kl, vl), do)
        cos, sin = rope_cos_sin(torch.arange(rank * ql.shape[1], (rank + 1) * ql.shape[1]), 8, THETA, torch.float64)
        qr, kr = apply_rope(ql, cos, sin), apply_rope(kl, cos, sin)  # what a transformers model hands its attention
        window = n_local if n_global == 0 else mask
        got = ringrt.attention(qr, kr, vl, window=window, inv_freq=inv_freq(8, THETA), algorithm=algorithm)
        grads = torch.autograd.grad(got, (ql, kl, vl), do)
        err = max([(got - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, ref_grads, strict=True)])
        out.append(err)
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    errors = {}
    for name, kw in {
        "window_type": dict(window="8"), "zigzag": dict(window=3, layout="zigzag"), "causal": dict(window=3, causal=False),
        "algorithm": dict(window=3, algorithm="ulysses"), "no_inv_freq": dict(window=LambdaMask(n_global=1, n_local=3)),
        "inv_freq_shape": dict(window=LambdaMask(n_global=1, n_local=3), inv_freq=torch.ones(3)),
    }.items():
        try:
            ringrt.attention(q, q, q, **kw)
            errors[name] = "no error"
        except ValueError as e:
            errors[name] = str(e)
    return out, errors


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 3])
def test_window_on_rotated_qk_matches_lambda_attention(world):
    results = run(_worker, world, 24)
    for errs, _ in results:
        assert max(errs) <= 1e-12, errs
    wants = {"window_type": "window='8' must be a positive int", "zigzag": "layout='zigzag' cannot be used with window=",
             "causal": "causal=False cannot be used with window=", "algorithm": "algorithm='ulysses' cannot be used with window=",
             "no_inv_freq": "inv_freq=None: a LambdaMask with n_global=1", "inv_freq_shape": "inv_freq must be a float tensor of shape (2,)"}
    for _, errors in results:
        for name, want in wants.items():
            assert want in errors[name] and errors[name].startswith("ringrt.attention"), (name, errors[name])
