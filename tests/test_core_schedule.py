"""The TokenRing schedule as a pure (rank x step) table: coverage, balance, consistent transfers."""

from __future__ import annotations

import itertools

import pytest

from ringrt.ops.layout import rank_chunks
from ringrt.schedules.tokenring_plan import block_for, relay_schedule, tokenring_schedule

CASES = [(w, causal, layout) for w in range(1, 7) for causal, layout in
         [(True, "zigzag"), (False, "contiguous"), (True, "contiguous"), (False, "zigzag")]]


def _pairs(owner, rank, world, block, layout):
    """Global (query chunk, key chunk) pairs a block covers."""
    qc, kc = rank_chunks(layout, owner, world), rank_chunks(layout, rank, world)
    pairs = {(qc[i], kc[j]) for i in range(*block.q_rows) for j in range(*block.k_rows)}
    # a diagonal block runs under a causal mask: pairs above the diagonal are masked out
    return {(i, j) for i, j in pairs if j <= i} if block.diagonal else pairs


@pytest.mark.parametrize("world,causal,layout", CASES)
def test_every_needed_pair_computed_exactly_once(world, causal, layout):
    n_total = 2 * world if layout == "zigzag" else world
    needed = {(i, j) for i in range(n_total) for j in range(n_total) if not causal or j <= i}
    seen = []
    for r in range(world):
        for st in tokenring_schedule(r, world, causal, layout):
            assert st.owner == (r + st.step) % world
            if st.block is not None:
                assert st.held is not None and st.held[0] <= st.block.q_rows[0] and st.block.q_rows[1] <= st.held[1]
                seen += sorted(_pairs(st.owner, r, world, st.block, layout))
                assert st.block.diagonal == (causal and st.owner == r)
    assert sorted(seen) == sorted(needed)


@pytest.mark.parametrize("world", range(1, 8))
def test_zigzag_causal_is_balanced(world):
    """Every rank computes the same number of score entries at every step (2C^2; C = chunk)."""
    for r in range(world):
        for st in tokenring_schedule(r, world, True, "zigzag"):
            b = st.block
            area = (b.q_rows[1] - b.q_rows[0]) * (b.k_rows[1] - b.k_rows[0])
            # diagonal: 2x2 chunks under a causal triangle = 2 full chunk-blocks + 2 half ones = 2C^2 + C
            assert area == (4 if b.diagonal else 2)


@pytest.mark.parametrize("world,causal,layout", CASES)
def test_transfers_match_between_sender_and_receiver(world, causal, layout):
    scheds = [tokenring_schedule(r, world, causal, layout) for r in range(world)]
    for r in range(world):
        for st in scheds[r]:
            if st.q_send is not None:
                peer = st.q_send.peer
                assert peer == (r - st.step - 1) % world  # own queries, straight to the rank visiting them next
                assert scheds[peer][st.step].q_recv == type(st.q_send)(r, st.q_send.rows)
                assert scheds[peer][st.step + 1].held == st.q_send.rows
                assert scheds[peer][st.step + 1].owner == r
            if st.out_send is not None:
                o = st.out_send.peer
                assert o == st.owner and st.step > 0
                assert scheds[o][st.step].out_recv == type(st.out_send)(r, st.out_send.rows)
            if st.out_recv is not None:
                src = st.out_recv.peer
                assert scheds[src][st.step].out_send == type(st.out_recv)(r, st.out_recv.rows)
        assert scheds[r][-1].q_send is None and scheds[r][-1].q_recv is None
        assert scheds[r][0].out_send is None and scheds[r][0].out_recv is None


def test_zigzag_w2_table():
    """The picture in Note [TokenRing]: W = 2, rank 0 holds [c0|c3], rank 1 holds [c1|c2]."""
    r0, r1 = tokenring_schedule(0, 2, True, "zigzag"), tokenring_schedule(1, 2, True, "zigzag")
    # step 1: rank 0 holds rank 1's q (owner 1 > 0) -> whole q vs its first key chunk
    assert (r0[1].owner, r0[1].block.q_rows, r0[1].block.k_rows) == (1, (0, 2), (0, 1))
    # step 1: rank 1 holds rank 0's q (owner 0 < 1) -> only the back chunk c3 vs all its keys
    assert (r1[1].owner, r1[1].block.q_rows, r1[1].block.k_rows) == (0, (1, 2), (0, 2))
    # rank 0 ships only the back half of its query; rank 1 ships all of its own
    assert r0[0].q_send.rows == (1, 2) and r1[0].q_send.rows == (0, 2)
    assert r0[1].out_send.rows == (0, 2) and r1[1].out_send.rows == (1, 2)


@pytest.mark.parametrize("world", range(2, 8))
def test_zigzag_causal_loads_every_link_direction_alike(world):
    """Queries go straight from their owner: the link a -> b carries a's queries to b (whole when b < a,
    back half when b > a) and the partial of b's queries over a's keys (back half when b < a, whole when
    b > a): 3 chunks of rows each way of every link, forward and backward alike."""
    q, out = {}, {}
    for r in range(world):
        for st in tokenring_schedule(r, world, True, "zigzag"):
            for load, t in ((q, st.q_send), (out, st.out_send)):
                if t is not None:
                    load[(r, t.peer)] = load.get((r, t.peer), 0) + t.rows[1] - t.rows[0]
    for a, b in itertools.permutations(range(world), 2):
        assert (q[(a, b)], out[(a, b)]) == ((2, 1) if b < a else (1, 2)), (a, b)


def test_causal_contiguous_skips_empty_pairs_and_stops_forwarding():
    """Contiguous causal: rank r needs no query of a lower owner; such queries stop travelling."""
    world = 4
    for r in range(world):
        for st in tokenring_schedule(r, world, True, "contiguous"):
            assert (st.block is None) == (st.owner < r)
    # owner 0's query is needed by nobody after itself: it is never sent
    assert tokenring_schedule(0, world, True, "contiguous")[0].q_send is None


@pytest.mark.parametrize("world", range(1, 6))
@pytest.mark.parametrize("direction", [-1, 1])
def test_relay_visits_every_rank_once_and_returns_home(world, direction):
    for causal, layout in [(True, "zigzag"), (False, "contiguous")]:
        visits = {o: [] for o in range(world)}
        for r in range(world):
            steps = relay_schedule(r, world, causal, layout, direction)
            for st in steps:
                visits[st.owner].append((st.step, r))
                assert st.send_to == (r + direction) % world and st.recv_from == (r - direction) % world
            # after the last hop the bundle is home: the last holder is the owner's neighbour
            last = steps[-1]
            assert (last.send_to == last.owner) or world == 1
        for v in visits.values():
            assert sorted(r for _, r in v) == list(range(world))
            # consecutive steps are consecutive ranks in the travel direction
            path = [r for _, r in sorted(v)]
            assert all((b - a) % world == direction % world for a, b in itertools.pairwise(path))


def test_block_for_rejects_nothing_for_known_layouts():
    for w in range(1, 6):
        for o in range(w):
            for r in range(w):
                for causal in (True, False):
                    for layout in ("zigzag", "contiguous"):
                        block_for(o, r, w, causal, layout)
