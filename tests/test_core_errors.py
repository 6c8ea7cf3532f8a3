"""Bad input fails on every rank with a clear message before any transfer; a silent peer times out."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ringrt
from ringrt.distributed.comm import P2P, CommTimeout
from tests.distributed import run


def _t(b, s, h, d, dtype=torch.float32):
    return torch.randn(b, s, h, d, dtype=dtype)


def _bad_cases(rank):
    """name -> kwargs for ringrt.attention on this rank (some differ between ranks)."""
    return {
        "odd_local_seq_on_rank1": dict(q=_t(1, 7 if rank == 1 else 8, 2, 4), k=_t(1, 7 if rank == 1 else 8, 2, 4),
                                       v=_t(1, 7 if rank == 1 else 8, 2, 4)),
        "local_seq_differs": dict(q=_t(1, 8 if rank else 12, 2, 4), k=_t(1, 8 if rank else 12, 2, 4), v=_t(1, 8 if rank else 12, 2, 4)),
        "heads_not_multiple": dict(q=_t(1, 8, 5, 4), k=_t(1, 8, 2, 4), v=_t(1, 8, 2, 4)),
        "unknown_algorithm": dict(q=_t(1, 8, 2, 4), k=_t(1, 8, 2, 4), v=_t(1, 8, 2, 4), algorithm="tokenrnig"),
        "unknown_layout": dict(q=_t(1, 8, 2, 4), k=_t(1, 8, 2, 4), v=_t(1, 8, 2, 4), layout="striped"),
        "dtype_differs": dict(q=_t(1, 8, 2, 4, torch.float64 if rank else torch.float32),
                              k=_t(1, 8, 2, 4, torch.float64 if rank else torch.float32),
                              v=_t(1, 8, 2, 4, torch.float64 if rank else torch.float32)),
        "kv_shape_mismatch": dict(q=_t(1, 8, 2, 4), k=_t(1, 8, 2, 4), v=_t(1, 8, 1, 4)),
        "bad_scale": dict(q=_t(1, 8, 2, 4), k=_t(1, 8, 2, 4), v=_t(1, 8, 2, 4), softmax_scale=-1.0),
        "causal_on_rank0_only": dict(q=_t(1, 8, 2, 4), k=_t(1, 8, 2, 4), v=_t(1, 8, 2, 4), causal=rank == 0, layout="zigzag"),
    }


def _worker_bad_input(rank, world):
    msgs = {}
    for name, kw in _bad_cases(rank).items():
        q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
        try:
            ringrt.attention(q, k, v, timeout=30, **kw)
            msgs[name] = None
        except ValueError as e:
            msgs[name] = str(e)
    # the group is still usable: nothing was left half-sent
    q = _t(1, 8, 2, 4)
    out = ringrt.attention(q, q, q, timeout=30)
    return msgs, out.shape


EXPECTED = {
    "odd_local_seq_on_rank1": "invalid input on rank 1: local_seq=7 cannot be used with layout='zigzag'",
    "local_seq_differs": "ranks disagree on local_seq (rank 0: 12, rank 1: 8",
    "heads_not_multiple": "heads=5 must be a positive multiple of kv_heads=2",
    "unknown_algorithm": "algorithm='tokenrnig' is not a known algorithm; valid: tokenring",
    "unknown_layout": "layout='striped' is not a known layout; valid: contiguous, zigzag",
    "dtype_differs": "ranks disagree on dtype (rank 0: torch.float32, rank 1: torch.float64",
    "kv_shape_mismatch": "k and v must have the same shape",
    "bad_scale": "softmax_scale=-1.0 must be a positive finite number",
    "causal_on_rank0_only": "ranks disagree on causal (rank 0: True, rank 1: False",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_raises_the_same_error_on_every_rank(world):
    for rank, (msgs, shape) in enumerate(run(_worker_bad_input, world, timeout=240)):
        assert shape == (1, 8, 2, 4)
        for name, want in EXPECTED.items():
            assert msgs[name] is not None, f"rank {rank}: {name} did not raise"
            assert want in msgs[name], f"rank {rank}: {name}: {msgs[name]!r}"


def test_single_process_errors_and_indivisible_lengths():
    q = _t(1, 7, 2, 4)
    with pytest.raises(ValueError, match=r"local_seq=7 cannot be used with layout='zigzag'.*multiple of 2.*pad_to_multiple"):
        ringrt.attention(q, q, q)
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        ringrt.attention(torch.zeros(2, 3), q, q)
    with pytest.raises(ValueError, match=r"topology='mesh' is not a known topology; valid: full, ring"):
        ringrt.attention(_t(1, 8, 2, 4), _t(1, 8, 2, 4), _t(1, 8, 2, 4), topology="mesh")


def _worker_silent_peer(rank, world):
    g = dist.new_group([0, 1])
    g2 = dist.new_group([0, 1])  # group creation is collective; afterwards rank 1 goes silent
    result = {}
    if rank == 0:
        ch = P2P(g, "q", timeout=1.5)
        pending = ch.post(step=5, recvs=[(1, 16)])
        try:
            pending.wait()
        except CommTimeout as e:
            result["p2p"] = str(e)
        q = _t(1, 8, 2, 4)
        try:
            ringrt.attention(q, q, q, timeout=1.5, group=g2)
        except CommTimeout as e:
            result["attention"] = str(e)
    return result


@pytest.mark.timeout(120)
def test_a_peer_that_never_sends_times_out_with_rank_peer_and_step():
    res = run(_worker_silent_peer, 2, timeout=90)[0]
    assert "rank 0 (of 2) on channel 'q', step 5: receive from peer 1 did not complete within 1.5 s" in res["p2p"]
    assert "did every rank of the group call it?" in res["attention"]
