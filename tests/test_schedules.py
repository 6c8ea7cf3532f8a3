"""Peer schedules (ring, allgather, ulysses, hybrid, auto) against the fp64 single-process reference:
outputs and gradients at W = 1..4, causal and not, MHA and GQA/MQA; bytes per rank against the
formulas in each schedule's note; bad head counts rejected on every rank before any transfer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ringrt
from ringrt.distributed import comm
from tests.distributed import run
from tests.reference import reference_attention

ALGOS = ("ring", "allgather", "ulysses", "hybrid", "auto")


def _heads(world: int) -> list[tuple[int, int]]:
    """(heads, kv_heads) pairs valid for Ulysses at this world size: MHA, GQA, and MQA (replicated K/V)."""
    if world == 3:
        return [(6, 6), (6, 3), (6, 1)]
    return [(4, 4), (8, 2), (8, 1)]


def _problem(seed: int, world: int, heads: int, kv_heads: int, dtype=torch.float64, batch: int = 2, per_rank: int = 8, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    s = per_rank * world
    q = torch.randn(batch, s, heads, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, s, kv_heads, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(batch, s, kv_heads, d, generator=g, dtype=torch.float64).to(dtype)
    do = torch.randn(batch, s, heads, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, do


def _run_one(q, k, v, do, *, algo, causal, kernel):
    layout = "zigzag" if causal else "contiguous"
    ql, kl, vl = (ringrt.shard(x, layout=layout).requires_grad_() for x in (q, k, v))
    comm.reset_stats()
    out = ringrt.attention(ql, kl, vl, causal=causal, algorithm=algo, kernel=kernel)
    out.backward(ringrt.shard(do, layout=layout))
    st = {name: (c.bytes_sent, c.bytes_recv, c.sends, c.recvs) for name, c in comm.stats().items()}
    return layout, out.detach(), ql.grad, kl.grad, vl.grad, st


def _exactness_worker(rank, world):
    """Every algorithm x causal x head config, fp64 with the math kernel: max abs error vs the reference."""
    errors, traffic = {}, {}
    for algo in ALGOS:
        for causal in (True, False):
            for heads, kv_heads in _heads(world):
                q, k, v, do = _problem(1, world, heads, kv_heads)
                layout, out, dq, dk, dv, st = _run_one(q, k, v, do, algo=algo, causal=causal, kernel="math")
                qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
                ref = reference_attention(qr, kr, vr, causal=causal)
                ref.backward(do)
                got = (out, dq, dk, dv)
                want = (ref.detach(), qr.grad, kr.grad, vr.grad)
                errors[(algo, causal, heads, kv_heads)] = max(
                    (a - ringrt.shard(b, layout=layout)).abs().max().item() for a, b in zip(got, want, strict=True)
                )
                traffic[(algo, causal, heads, kv_heads)] = st
    return errors, traffic


def _expected_bytes(algo: str, world: int, heads: int, kv_heads: int, *, batch=2, per_rank=8, d=8, e=8, a=8) -> dict:
    """Bytes one rank sends over forward + backward, per channel, from each schedule's note."""
    s_l = per_rank
    w = world
    if w == 1:
        return {}
    kv = 2 * batch * s_l * kv_heads * d  # K and V of one shard, elements
    if algo == "ring":
        return {"kv": 2 * (w - 1) * kv * e, "dkv": w * kv * a}
    if algo == "allgather":
        return {"allgather": (w - 1) * kv * (2 * e + a)}
    if algo == "ulysses":
        kvh = max(kv_heads, w)
        per = batch * s_l * d * e * (2 * heads + 2 * kvh)  # q, k, v in + out back (and the same in backward)
        return {"a2a": 2 * (w - 1) * per // w}
    if algo == "hybrid":  # W = 4: u = 2 Ulysses x 2-member ring; W = 2, 3 have no proper divisor: u = 1 (a ring)
        u = 2 if w == 4 else 1
        n = w // u
        kvh = max(kv_heads, u)
        out = {"a2a": 2 * (u - 1) * (batch * s_l * d * e * (2 * heads + 2 * kvh)) // u} if u > 1 else {}
        if n > 1:
            ring_kv = 2 * batch * (u * s_l) * (kvh // u) * d
            out.update(kv=2 * (n - 1) * ring_kv * e, dkv=n * ring_kv * a)
        return out
    raise AssertionError(algo)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_schedules_match_reference_and_byte_formulas(world):
    results = run(_exactness_worker, world)
    for rank, (errors, traffic) in enumerate(results):
        assert len(errors) == len(ALGOS) * 2 * 3
        for key, err in errors.items():
            # fp64 end to end: errors are rounding of O(S) sums, ~1e-15; 1e-12 leaves 1000x headroom
            assert err < 1e-12, (rank, key, err)
        for (algo, causal, heads, kv_heads), st in traffic.items():
            sent = {name: v[0] for name, v in st.items() if v[0] or v[1]}
            recv = {name: v[1] for name, v in st.items() if v[0] or v[1]}
            if algo == "auto":
                continue  # auto's traffic is that of the schedule it picked: checked in test_auto_*
            want = _expected_bytes(algo, world, heads, kv_heads)
            assert sent == want, (rank, algo, causal, heads, kv_heads, sent, want)
            assert recv == want, (rank, algo, causal, heads, kv_heads, recv, want)
            if algo == "ulysses" and world > 1:
                # q, k, v in ONE all-to-all, the output in one; the same in backward: 4 collectives of W - 1 messages
                assert st["a2a"][2:] == (4 * (world - 1), 4 * (world - 1)), (rank, causal, heads, kv_heads, st["a2a"])


def _fp32_worker(rank, world):
    """fp32 inputs with the aten CPU flash kernel (the default on CPU): error vs fp64, and the error of
    plain fp32 PyTorch attention vs fp64 on the same inputs as the yardstick."""
    out = {}
    for algo in ALGOS:
        for causal in (True, False):
            heads, kv_heads = (8, 2)
            q, k, v, do = _problem(2, world, heads, kv_heads, dtype=torch.float32, per_rank=32, d=32)
            layout, o, dq, dk, dv, _ = _run_one(q, k, v, do, algo=algo, causal=causal, kernel="cpu")
            qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
            ref = reference_attention(qr, kr, vr, causal=causal)
            ref.backward(do.double())
            q3, k3, v3 = (x.clone().requires_grad_() for x in (q, k, v))
            base = F.scaled_dot_product_attention(
                q3.transpose(1, 2), k3.transpose(1, 2), v3.transpose(1, 2), is_causal=causal, enable_gqa=True
            ).transpose(1, 2)
            base.backward(do)
            errs, base_errs = [], []
            for got, b32, want in ((o, base.detach(), ref.detach()), (dq, q3.grad, qr.grad), (dk, k3.grad, kr.grad), (dv, v3.grad, vr.grad)):
                w = ringrt.shard(want, layout=layout)
                errs.append((got.double() - w).abs().max().item())
                base_errs.append((ringrt.shard(b32, layout=layout).double() - w).abs().max().item())
            out[(algo, causal)] = (errs, base_errs)
    return out


@pytest.mark.timeout(120)
def test_schedules_fp32_cpu_kernel_within_twice_torch_error():
    for rank_res in run(_fp32_worker, 4):
        for key, (errs, base) in rank_res.items():
            for name, e, b in zip(("out", "dq", "dk", "dv"), errs, base, strict=True):
                # flash-attention's rule: at most 2x the error of same-precision PyTorch attention,
                # plus 1e-6 for sums that land exactly on the reference in PyTorch's order
                assert e <= 2 * b + 1e-6, (key, name, e, b)


def _bad_heads_worker(rank, world):
    msgs = {}
    for algo, heads, kv_heads in (("ulysses", 6, 6), ("ulysses", 12, 3), ("hybrid", 6, 6)):
        q = torch.randn(1, 4, heads, 8, dtype=torch.float64)
        k = torch.randn(1, 4, kv_heads, 8, dtype=torch.float64)
        comm.reset_stats()
        try:
            ringrt.attention(q, k, k.clone(), causal=True, algorithm=algo)
            msgs[(algo, heads, kv_heads)] = None
        except ValueError as err:
            moved = sum(c.bytes_sent + c.bytes_recv for c in comm.stats().values())
            msgs[(algo, heads, kv_heads)] = (str(err), moved)
    return msgs


@pytest.mark.timeout(60)
def test_ulysses_rejects_head_counts_on_every_rank_before_any_transfer():
    results = run(_bad_heads_worker, 4)
    for msgs in results:
        for key in ((("ulysses", 6, 6)), ("ulysses", 12, 3)):
            text, moved = msgs[key]
            assert moved == 0
            assert "ulysses" in text
        assert "heads=6 must be divisible by the Ulysses degree 4" in msgs[("ulysses", 6, 6)][0]
        assert "valid degrees: [1, 2, 3, 6]" in msgs[("ulysses", 6, 6)][0]
        assert "kv_heads=3 must be divisible by the Ulysses degree 4, or divide it" in msgs[("ulysses", 12, 3)][0]
        assert "[1, 3, 6, 12]" in msgs[("ulysses", 12, 3)][0]
        # hybrid picks a degree that fits 6 heads at W=4 (u=2): it runs
        assert msgs[("hybrid", 6, 6)] is None


def _auto_worker(rank, world, machine_dict, causal):
    import os

    from ringrt.schedules import auto
    from ringrt.schedules import costmodel

    os.environ["RINGRT_AUTO_TUNE"] = "0"  # the model's own choice (tuning: test_auto_measures_*)
    auto._MACHINES["cpu"] = costmodel.machine_from_dict(machine_dict)
    auto._CHOICES.clear()
    heads, kv_heads = 8, 2
    q, k, v, do = _problem(3, world, heads, kv_heads)
    _, out, *_rest, st = _run_one(q, k, v, do, algo="auto", causal=causal, kernel="math")
    channels = sorted(n for n, c in st.items() if c[0] or c[1])
    return channels


def _model_pick(machine, world, causal):
    from ringrt.schedules.auto import choose
    from ringrt.schedules import costmodel

    p = costmodel.Problem(batch=2, seq=8 * world, heads=8, kv_heads=2, head_dim=8, dtype_bytes=8, causal=causal,
                          backward=True, layout="zigzag" if causal else "contiguous")
    return choose(p, machine, world)[0]


CHANNELS = {"tokenring": ["q", "out"], "ring": ["kv", "dkv"], "allgather": ["allgather"], "ulysses": ["a2a"],
            "hybrid": ["a2a", "dkv", "kv"]}


@pytest.mark.timeout(120)
def test_auto_runs_the_schedule_the_model_ranks_first():
    from ringrt.schedules import costmodel

    base = costmodel.PRESETS["cpu"]
    # two machines that make different schedules win: latency-bound (few big messages win) and
    # bandwidth-poor with free collectives (Ulysses' all-to-all moves least per rank here)
    slow_lat = costmodel.machine_to_dict(base)
    slow_lat["intra"] = {"bandwidth": 1e12, "latency": 1.0, "duplex": True}
    cheap_a2a = costmodel.machine_to_dict(base)
    cheap_a2a["intra"] = {"bandwidth": 1e3, "latency": 0.0, "duplex": True}
    picks = set()
    for md in (slow_lat, cheap_a2a):
        want = _model_pick(costmodel.machine_from_dict(md), 4, True)
        picks.add(want)
        for channels in run(_auto_worker, 4, md, True):
            assert channels == sorted(["auto", *CHANNELS[want]]), (want, channels)
    assert len(picks) == 2, picks


def _tuning_worker(rank, world, machine_dict, slow: str | None, tune_env: str):
    """auto on a machine where the model ties every schedule: the first call measures the shortlist;
    ``slow`` (if set) is made 60 ms slower on every rank, so the measurement must not pick it."""
    import dataclasses
    import os
    import time

    from ringrt.schedules import auto
    from ringrt.schedules import costmodel

    os.environ["RINGRT_AUTO_TUNE"] = tune_env
    auto._MACHINES["cpu"] = costmodel.machine_from_dict(machine_dict)
    auto._CHOICES.clear()
    if slow is not None:
        fast = auto.SCHEDULES[slow]

        def slowed(*a):
            time.sleep(0.06)
            return fast.forward(*a)

        auto.SCHEDULES[slow] = dataclasses.replace(fast, forward=slowed)
    q, k, v, do = _problem(5, world, 8, 8)
    first = _run_one(q, k, v, do, algo="auto", causal=True, kernel="math")
    (key, (name, ests, measured)), = auto._CHOICES.items()
    second = _run_one(q, k, v, do, algo="auto", causal=True, kernel="math")
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = reference_attention(qr, kr, vr, causal=True)
    ref.backward(do)
    err = max((a - ringrt.shard(b, layout="zigzag")).abs().max().item()
              for run_ in (first, second) for a, b in zip(run_[1:5], (ref.detach(), qr.grad, kr.grad, vr.grad), strict=True))
    channels = [sorted(n for n, c in r[5].items() if c[0] or c[1]) for r in (first, second)]
    return name, [e.schedule for e in ests], measured, err, channels


@pytest.mark.timeout(180)
def test_auto_measures_the_candidates_the_model_cannot_tell_apart():
    from ringrt.schedules.auto import TUNE_MAX
    from ringrt.schedules import costmodel

    # every schedule priced at ~1 s: the same per-call overhead dwarfs free compute and links (a tie)
    free = costmodel.machine_to_dict(costmodel.PRESETS["cpu"])
    free.update(peak=1e30, bwd_peak=1e30, overhead=0.0, mem_bw=1e30, intra={"bandwidth": 1e30, "latency": 0.0, "duplex": True},
                call_overheads=[{"schedule": n, "world": 2, "backward": True, "seconds": 1.0} for n in costmodel.SCHEDULES])
    slow = costmodel.rank_schedules(
        costmodel.Problem(batch=2, seq=16, heads=8, kv_heads=8, head_dim=8, dtype_bytes=8, causal=True, backward=True,
                          layout="zigzag"), costmodel.machine_from_dict(free), 2)[0].schedule
    res = run(_tuning_worker, 2, free, slow, "1")
    picks = {r[0] for r in res}
    assert len(picks) == 1, res  # every rank runs the same schedule
    name, order, measured, err, channels = res[0]
    assert list(measured) == order[:TUNE_MAX] and len(measured) > 1  # the shortlist, in the model's order
    assert res[1][2] == measured  # the slowest rank's times, identical on every rank
    assert name == min(measured, key=measured.get) != slow  # the measurement overrode the model's first pick
    assert measured[slow] >= 0.06
    for _, _, _, e, _ in res:
        assert e < 1e-12
    # the tuning traffic is counted on the "auto" channel; the second call reuses the choice silently
    assert channels[0] == sorted(["auto", *CHANNELS[name]]) and channels[1] == sorted(CHANNELS[name])
    off = run(_tuning_worker, 2, free, None, "0")
    assert all(r[2] == {} and r[0] == slow for r in off)  # RINGRT_AUTO_TUNE=0: the model's first choice
