"""Cost model: pure functions (monotonicity, closed forms vs the schedule tables), published anchors
within their bands, and auto's pick = argmin of the estimates."""

from __future__ import annotations

import pytest

from ringrt.schedule import tokenring_schedule
from ringrt.schedules.auto import choose
from ringrt.simulate import costmodel as cm
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
                                                                tokenring_schedule(r, world, causal, layout)):
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
