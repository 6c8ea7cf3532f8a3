"""Cost model: pure functions (monotonicity, closed forms vs the schedule tables), published anchors
within their bands, and auto's pick = argmin of the estimates."""

from __future__ import annotations

import pytest

from ringrt.schedules.tokenring_plan import tokenring_schedule
from ringrt.schedules.auto import choose
from ringrt.schedules import costmodel as cm
from ringrt.simulate.anchors import all_anchors


def _p(**kw):
    base = dict(seq=64 * 1024, heads=32, kv_heads=8, head_dim=128, dtype_bytes=2, causal=True, backward=True)
    base.update(kw)
    return cm.Problem(**base)


@pytest.mark.timeout(60)
def test_tokenring_closed_form_matches_schedule_tables():
    for world in range(1, 10):
        for causal in (True, False):
            for layout in ("zigzag", "contiguous"):
                for r in range(world):
                    for (block, q_rows, out_rows, _), st in zip(cm.tokenring_traffic(r, world, causal, layout),
                                                                tokenring_schedule(r, world, causal, layout), strict=True):
                        assert block == st.block
                        assert q_rows == (st.q_send.rows if st.q_send else None)
                        assert out_rows == (st.out_send.rows if st.out_send else None)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("schedule", cm.SCHEDULES)
def test_estimates_grow_with_sequence_and_shrink_with_bandwidth(schedule):
    """1000x less bandwidth makes every schedule communication-bound, so it must be slower
    (at 10x less, full overlap may still hide the transfers: equal times are right then)."""
    m = cm.PRESETS["h800"]
    slow = cm.machine_from_dict({**cm.machine_to_dict(m), "intra": {"bandwidth": m.intra.bandwidth / 1000, "latency": m.intra.latency, "duplex": True}})
    for w in (2, 8):
        times = [cm.estimate(schedule, _p(seq=s), m, w).total for s in (16384, 32768, 65536)]
        assert times == sorted(times) and times[0] < times[-1], (schedule, w, times)
        assert cm.estimate(schedule, _p(), slow, w).total > cm.estimate(schedule, _p(), m, w).total
        assert cm.estimate(schedule, _p(backward=False), m, w).total < cm.estimate(schedule, _p(), m, w).total


def test_causal_zigzag_beats_contiguous_ring_and_kv_bytes_follow_gqa():
    m = cm.PRESETS["a100"]
    zig = cm.estimate("ring", _p(), m, 8).total
    plain = cm.estimate("ring", _p(layout="contiguous"), m, 8).total
    assert plain > 1.5 * zig
    # with GQA the KV-ring moves 4x less than with MHA; TokenRing's traffic does not depend on kv_heads
    mha, gqa = cm.estimate("ring", _p(kv_heads=32), m, 8), cm.estimate("ring", _p(kv_heads=8), m, 8)
    assert mha.comm > gqa.comm
    assert cm.estimate("tokenring", _p(kv_heads=32), m, 8).comm == pytest.approx(cm.estimate("tokenring", _p(kv_heads=8), m, 8).comm)


def test_published_anchors_within_bands():
    for a in all_anchors():
        assert a.ok, (a.name, a.value, a.band, a.published)


def test_ulysses_invalid_where_heads_do_not_split():
    m = cm.PRESETS["h100"]
    assert cm.estimate("ulysses", _p(), m, 64).total == float("inf")
    assert "ulysses" not in cm.candidates(_p(), 64, 8)
    assert "hybrid" in cm.candidates(_p(), 64, 8)


@pytest.mark.parametrize("machine", ["h100", "a10", "cpu"])
def test_auto_pick_is_argmin_of_independent_estimates(machine):
    m = cm.PRESETS[machine]
    for w in (2, 4, 8):
        for kv in (32, 8):
            for causal in (True, False):
                p = _p(seq=16384, kv_heads=kv, causal=causal)
                name, ests = choose(p, m, w)
                direct = {s: cm.estimate(s, p, m, w).total for s in cm.candidates(p, w, m.ranks_per_node)}
                assert name == min(direct, key=direct.get)
                assert {e.schedule: e.total for e in ests} == direct


# ------------------------------------------------------------------------------------------------
# CPU calibration terms: kernel tiling, per-head_dim rates, per-call overheads.
# ------------------------------------------------------------------------------------------------


def _tile_pairs_area(sq: int, sk: int, q_split: int, kv_split: int) -> int:
    """Reference: enumerate every (query tile, key tile) pair; a pair is computed unless its first key
    lies beyond the query tile's last row (top-left causal)."""
    area = 0
    for q0 in range(0, sq, q_split):
        rows = min(q_split, sq - q0)
        for k0 in range(0, sk, kv_split):
            if k0 <= q0 + rows - 1:
                area += rows * min(kv_split, sk - k0)
    return area


def test_aten_cpu_tiling_matches_tile_pair_enumeration():
    from ringrt.schedules.tiling import aten_cpu_splits, computed_area

    for sq, sk in [(16, 16), (128, 128), (256, 256), (512, 512), (768, 768), (1024, 1024), (2048, 2048), (1000, 1000),
                   (256, 1024), (1024, 512), (3072, 3072)]:
        qs, ks = aten_cpu_splits(sq, sk)
        assert computed_area(sq, sk, causal=True, tiling="aten_cpu") == _tile_pairs_area(sq, sk, qs, ks)
        assert computed_area(sq, sk, causal=False, tiling="aten_cpu") == sq * sk
        assert computed_area(sq, sk, causal=True, tiling="ideal") == sq * sk / 2
    # below 512 keys one key tile covers the block: a causal block costs the whole rectangle
    assert computed_area(256, 256, causal=True, tiling="aten_cpu") == 256 * 256
    assert computed_area(1024, 1024, causal=True, tiling="aten_cpu") == 0.75 * 1024 * 1024
    with pytest.raises(ValueError, match="tiling"):
        computed_area(8, 8, causal=True, tiling="square")


def _cpu_machine(**kw) -> cm.Machine:
    base = dict(name="test cpu", peak=100e9, bwd_peak=50e9, m_half=64.0, overhead=0.0, mem_bw=10e9,
                intra=cm.Link(bandwidth=1e9, latency=1e-4), ranks_per_node=64, overlap=0.0, cores=8, threads=1,
                simulated=False, tiling="aten_cpu")
    base.update(kw)
    return cm.Machine(**base)


def test_kernel_time_uses_the_rate_calibrated_at_that_head_dim():
    rates = (cm.KernelRate(head_dim=32, peak=40e9, bwd_peak=20e9, m_half=100.0),
             cm.KernelRate(head_dim=128, peak=160e9, bwd_peak=80e9, m_half=100.0))
    m = _cpu_machine(kernel_rates=rates)
    for d, peak, bwd in [(32, 40e9, 20e9), (128, 160e9, 80e9), (16, 40e9, 20e9), (256, 160e9, 80e9), (64, 100e9, 50e9)]:
        p = cm.Problem(seq=1024, heads=4, kv_heads=4, head_dim=d, dtype_bytes=4)
        eff = 512 / (512 + 100.0)
        flops = 4.0 * 4 * d * 512 * 512
        assert cm.kernel_time(m, p, 512, 512, 4, diagonal=False, backward=False) == pytest.approx(flops / (peak * eff))
        assert cm.kernel_time(m, p, 512, 512, 4, diagonal=False, backward=True) == pytest.approx(2.5 * flops / (bwd * eff))
    # a causal 256-row block costs its full rectangle on the CPU tiling, half of it on the ideal one
    p = cm.Problem(seq=1024, heads=4, kv_heads=4, head_dim=32, dtype_bytes=4)
    full = cm.kernel_time(m, p, 256, 256, 4, diagonal=False, backward=False)
    assert cm.kernel_time(m, p, 256, 256, 4, diagonal=True, backward=False) == pytest.approx(full)
    ideal = cm.machine_from_dict({**cm.machine_to_dict(m), "tiling": "ideal"})
    assert cm.kernel_time(ideal, p, 256, 256, 4, diagonal=True, backward=False) == pytest.approx(full / 2)


def test_estimate_adds_the_measured_call_overhead_interpolated_in_world():
    ov = (cm.CallOverhead(schedule="ring", world=2, backward=False, seconds=2e-3),
          cm.CallOverhead(schedule="ring", world=4, backward=False, seconds=6e-3),
          cm.CallOverhead(schedule="ring", world=2, backward=True, seconds=5e-3))
    m = _cpu_machine(call_overheads=ov)
    bare = _cpu_machine()
    p = cm.Problem(seq=48 * 64, heads=8, kv_heads=8, head_dim=32, dtype_bytes=4)
    for w, extra in [(2, 2e-3), (4, 6e-3), (3, 4e-3), (8, 14e-3)]:
        e, e0 = cm.estimate("ring", p, m, w), cm.estimate("ring", p, bare, w)
        assert e.overhead == pytest.approx(extra)
        assert e.total == pytest.approx(e0.total + extra)
        assert e.compute == pytest.approx(e0.compute)
    pb = cm.Problem(seq=4096, heads=8, kv_heads=8, head_dim=32, dtype_bytes=4, backward=True)
    assert cm.estimate("ring", pb, m, 4).overhead == pytest.approx(5e-3)  # one measured W: that value
    assert cm.estimate("tokenring", p, m, 4).overhead == 0.0  # nothing measured for it
    assert cm.machine_from_dict(cm.machine_to_dict(m)) == m  # round trip through the calibration JSON


def test_auto_pick_is_argmin_including_call_overheads():
    """A large measured overhead on the schedule the steps alone favour must move auto's pick."""
    p = cm.Problem(seq=2048, heads=8, kv_heads=8, head_dim=32, dtype_bytes=4, causal=True, backward=False)
    bare = _cpu_machine()
    first, ests = choose(p, bare, 4)
    runner_up = ests[1].schedule
    m = _cpu_machine(call_overheads=(cm.CallOverhead(schedule=first, world=4, backward=False, seconds=10.0),))
    name, ests = choose(p, m, 4)
    direct = {s: cm.estimate(s, p, m, 4).total for s in cm.candidates(p, 4, m.ranks_per_node)}
    assert name == min(direct, key=direct.get) == runner_up
    assert {e.schedule: e.total for e in ests} == direct


def test_measured_rank_slowdown_replaces_the_cores_formula():
    """Compute (kernels and merges, overhead-free) scales by exactly the measured slowdown at W ranks;
    between measured rank counts the factor is linear."""
    slow = (cm.RankSlowdown(ranks=1, factor=1.0), cm.RankSlowdown(ranks=2, factor=1.0), cm.RankSlowdown(ranks=4, factor=3.5))
    m = _cpu_machine(slowdowns=slow, cores=2)
    alone = _cpu_machine(cores=None)
    formula = _cpu_machine(cores=2)
    p = cm.Problem(seq=48 * 64, heads=8, kv_heads=8, head_dim=32, dtype_bytes=4, causal=False)
    for w, factor, by_cores in [(2, 1.0, 1.0), (4, 3.5, 2.0), (3, 2.25, 1.5)]:
        base = cm.estimate("ring", p, alone, w).compute
        assert cm.estimate("ring", p, m, w).compute == pytest.approx(factor * base)
        assert cm.estimate("ring", p, formula, w).compute == pytest.approx(by_cores * base)
    assert cm.machine_from_dict(cm.machine_to_dict(m)) == m


def test_single_step_schedules_use_the_burst_slowdown_ring_schedules_the_step_slowdown():
    """Ulysses and all-gather compute in one uninterrupted call per rank: they pay the burst factor;
    TokenRing and the KV-ring compute in lockstep steps: they pay the step factor."""
    steps = (cm.RankSlowdown(ranks=1, factor=1.0), cm.RankSlowdown(ranks=4, factor=3.0))
    bursts = (cm.RankSlowdown(ranks=1, factor=1.0), cm.RankSlowdown(ranks=4, factor=2.0))
    m = _cpu_machine(slowdowns=steps, burst_slowdowns=bursts, cores=2)
    only_steps = _cpu_machine(slowdowns=steps, cores=2)
    alone = _cpu_machine(cores=None)
    p = cm.Problem(seq=48 * 64, heads=8, kv_heads=8, head_dim=32, dtype_bytes=4, causal=False)
    for name, factor in [("tokenring", 3.0), ("ring", 3.0), ("ulysses", 2.0), ("allgather", 2.0)]:
        base = cm.estimate(name, p, alone, 4).compute
        assert cm.estimate(name, p, m, 4).compute == pytest.approx(factor * base), name
        assert cm.estimate(name, p, only_steps, 4).compute == pytest.approx(3.0 * base), name  # no burst table: steps
    assert cm.machine_from_dict(cm.machine_to_dict(m)) == m


def test_linear_cost_adds_seconds_per_byte_of_the_query_shard():
    """total = priced steps + per-call overhead + linear cost x shard bytes (B * S/W * (H + 2 H_kv) * D * e);
    linear in W between measured W; nothing where nothing was measured (another schedule, W = 1)."""
    ov = (cm.CallOverhead(schedule="tokenring", world=2, backward=False, seconds=3e-3),)
    lin = (cm.LinearCost(schedule="tokenring", world=2, backward=False, seconds_per_byte=1e-9),
           cm.LinearCost(schedule="tokenring", world=4, backward=False, seconds_per_byte=3e-9))
    plain = _cpu_machine(call_overheads=ov)
    m = _cpu_machine(call_overheads=ov, linear_costs=lin)
    p = cm.Problem(batch=2, seq=48 * 64, heads=8, kv_heads=2, head_dim=32, dtype_bytes=4, causal=True)
    for w, per_byte in [(2, 1e-9), (3, 2e-9), (4, 3e-9)]:
        shard = 2 * (48 * 64 // w) * (8 + 2 * 2) * 32 * 4
        a, b = cm.estimate("tokenring", p, plain, w), cm.estimate("tokenring", p, m, w)
        assert b.total - a.total == pytest.approx(per_byte * shard)
        assert b.overhead - a.overhead == pytest.approx(per_byte * shard)
    assert cm.estimate("ring", p, m, 4).total == cm.estimate("ring", p, plain, 4).total
    assert cm.estimate("tokenring", p, m, 1).total == cm.estimate("tokenring", p, plain, 1).total
    assert cm.machine_from_dict(cm.machine_to_dict(m)) == m


def test_regime_link_rates_give_this_cpu_the_gpus_flops_per_byte():
    from ringrt.simulate.regimes import equivalent_rate, link_spec, regimes, table

    m = cm.PRESETS["cpu"]
    rows = table(m)
    assert [r["topology"] for r in rows] == ["switch", "mesh", "switch"]
    for reg, row in zip(regimes(), rows, strict=True):
        rate = equivalent_rate(reg, m.peak)
        assert abs(m.peak / rate - reg.flops / reg.link_bytes) < 1e-6 * reg.ratio  # same FLOPs per byte
        assert row["link"] == link_spec(rate) and row["link"].startswith("rate=")
    a10 = regimes()[0]
    assert round(a10.ratio) == round(70e12 / 13.2e9)
    assert link_spec(15.81e6) == "rate=126mbit,burst=64kb"


def test_mesh_links_carry_an_all_to_all_at_once_and_a_switch_shares_a_ranks_sends():
    base = cm.PRESETS["cpu"]
    p = cm.Problem(seq=3 * 1024, heads=12, kv_heads=12, head_dim=64, dtype_bytes=4, causal=True, backward=True)
    times = {}
    for bw in (25e6, 2.5e6):  # 2.5e6: slow enough that TokenRing waits on its links
        for name, link in {"one-by-one": cm.Link(bandwidth=bw, latency=1e-4),
                           "mesh": cm.Link(bandwidth=bw, latency=1e-4, per_peer=True),
                           "switch": cm.Link(bandwidth=bw, latency=1e-4, shared_egress=True)}.items():
            m = cm.Machine(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, "intra": link})
            times[name, bw] = {s: cm.estimate(s, p, m, 3).total for s in ("ulysses", "tokenring", "ring")}
    for bw in (25e6, 2.5e6):
        assert times["mesh", bw]["ulysses"] < times["one-by-one", bw]["ulysses"]  # two pieces at once instead of in turn
        assert times["mesh", bw]["ring"] == times["one-by-one", bw]["ring"] == times["switch", bw]["ring"]  # one peer per step
        # TokenRing's W - 1 query streams come in at once over a mesh, share one downlink otherwise
        assert times["mesh", bw]["tokenring"] <= times["one-by-one", bw]["tokenring"]
    assert times["mesh", 2.5e6]["tokenring"] < times["one-by-one", 2.5e6]["tokenring"]
    assert times["switch", 2.5e6]["tokenring"] > times["one-by-one", 2.5e6]["tokenring"]  # q and partials share the uplink
