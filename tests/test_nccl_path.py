"""The NCCL code path, driven on CPU through a recording fake process group (``tests/fake_nccl.py``).

What NCCL needs and the gloo tests cannot show: waits that never block the host (no timeout
argument: stream-ordered), one ``batch_isend_irecv`` per exchange, a communicator of its own for
every channel in flight (NCCL ignores tags), exchanges that post their sends and receives together,
failures attributed to every peer of a coalesced batch and told apart from timeouts, NCCL subgroups
without dedicated groups rejected before any transfer, and the relay topology overlapping each
direction's transfer with compute. One process plays each rank in turn; seconds in all.
"""

from __future__ import annotations

import collections
import datetime

import pytest
import torch
import torch.distributed as dist

import ringrt
from ringrt.distributed import comm, groups
from ringrt.lm_infinite import LambdaMask
from ringrt.model import parallel
from ringrt.distributed.agree import agree_fields
from tests.fake_nccl import Recorder, fake_rank

B, D = 1, 8


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "RINGRT_ULYSSES_DEGREE"):
        monkeypatch.delenv(name, raising=False)


def _qkv(s: int, heads: int = 4, kv_heads: int = 2):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, s, h, D, generator=g).requires_grad_() for h in (heads, kv_heads, kv_heads))
    return q, k, v


def _attention(algorithm: str, s: int = 8, group=None, **kw):
    q, k, v = _qkv(s)
    ringrt.attention(q, k, v, causal=True, algorithm=algorithm, group=group, **kw).sum().backward()


def _lambda(algorithm: str, s: int = 4, group=None):
    q, k, v = _qkv(s)
    mask = LambdaMask(n_global=2, n_local=5)  # the halo reaches two ranks back; global tokens ride the relay
    ringrt.lambda_attention(q, k, v, mask=mask, algorithm=algorithm, group=group).sum().backward()


CALLS = {
    "tokenring": lambda: _attention("tokenring"),
    "tokenring_ring_topology": lambda: _attention("tokenring", topology="ring"),
    "ring": lambda: _attention("ring"),
    "hybrid": lambda: _attention("hybrid"),  # W = 4: Ulysses pairs x a 2-member KV-ring
    "allgather": lambda: _attention("allgather"),
    "ulysses": lambda: _attention("ulysses"),
    "lambda_ring": lambda: _lambda("ring"),
    "lambda_tokenring": lambda: _lambda("tokenring"),
}
WORLD = 4


def _record(monkeypatch, call, world: int = WORLD, ranks=None, *, nccl: bool = True) -> dict[int, Recorder]:
    rec, out = Recorder().install(monkeypatch, nccl=nccl), {}
    for r in ranks if ranks is not None else range(world):
        with fake_rank(r, world):
            call()
        out[r] = rec.take()
    return out


def _p2p_waits(rec: Recorder) -> list:
    return [t for what, t in rec.waits if what.startswith("p2p")]


@pytest.mark.parametrize("name", list(CALLS))
def test_nccl_waits_never_block_the_host_and_each_exchange_is_one_batch(monkeypatch, name):
    for rank, rec in _record(monkeypatch, CALLS[name]).items():
        assert not rec.direct, (rank, "plain isend/irecv on the NCCL path", rec.direct)
        timed = [(what, t) for what, t in rec.waits if t is not None]
        assert not timed, (rank, "a wait with a timeout blocks the host thread on NCCL", timed)
        for p in rec.posts:
            if not (p.sends or p.recvs):
                continue
            assert len(p.batches) == 1, (rank, p.channel, p.step, "posts must be one batch_isend_irecv", p.batches)
            (ops,) = p.batches
            assert sorted((k, peer) for k, peer, _ in ops) == sorted(
                [("send", peer) for peer, _ in p.sends] + [("recv", peer) for peer, _ in p.recvs])
            assert all(g is p.group for _, _, g in ops), (rank, p.channel)
        assert not rec.inflight, (rank, "transfers left unfinished", [(p.channel, p.step) for p in rec.inflight])
        if name in ("allgather", "ulysses"):
            assert not rec.posts and rec.waits  # collectives only, waited stream-ordered


def _nccl_order_completes(recs: dict[int, Recorder], channel: str) -> list:
    """Run one channel's posts as NCCL would: each rank's posts queue on its communicator and only
    the head post runs; a post finishes once every send and receive in it meets its counterpart (same
    peer pair, same bytes) in the peer's head post. Returns what is left when nothing can finish (a
    deadlock), [] when every post finishes."""
    queues = {r: [collections.Counter([("send", peer, n) for peer, n in p.sends] + [("recv", peer, n) for peer, n in p.recvs])
                  for p in rec.posts if p.channel == channel and (p.sends or p.recvs)] for r, rec in recs.items()}
    while any(queues.values()):
        heads = {r: q[0] for r, q in queues.items() if q}
        done = [r for r, h in heads.items()
                if all(peer in heads and heads[peer][("recv" if kind == "send" else "send", r, n)] >= c
                       for (kind, peer, n), c in h.items())]
        if not done:
            return [(r, dict(h)) for r, h in heads.items()]
        for r in done:
            queues[r].pop(0)
    return []


@pytest.mark.parametrize("world", [2, 3, 4])
def test_tokenring_posts_in_flight_together_complete_in_nccl_order(monkeypatch, world):
    """TokenRing keeps several posts of one channel in flight (every step's query pieces at once): on
    NCCL they run one after another per communicator, so every rank must post them in an order the
    others match one for one. Checked with bundles big enough to be cut into pieces."""
    monkeypatch.setattr("ringrt.schedules.tokenring_plan.PIECE_BYTES", 64)
    recs = _record(monkeypatch, lambda: _attention("tokenring", s=4 * world), world=world)
    assert max(sum(p.channel == "q" for p in r.posts) for r in recs.values()) > world, "expected pieces"
    for channel in ("q", "out"):
        assert _nccl_order_completes(recs, channel) == [], channel


@pytest.mark.parametrize("name", [n for n in CALLS if n not in ("allgather", "ulysses")])
def test_channels_in_flight_together_never_share_a_communicator(monkeypatch, name):
    for rank, rec in _record(monkeypatch, CALLS[name]).items():
        assert rec.posts, name
        other = [x for x in rec.shared if x[0] != x[1]]
        assert not other, (rank, "(posted, in flight on the same group, step)", other)
        by_channel = collections.defaultdict(set)
        for p in rec.posts:
            by_channel[p.channel].add(id(p.group))
        pairs = {"tokenring": ("q", "out"), "ring": ("kv", "dkv"), "hybrid": ("kv", "dkv"),
                 "lambda_ring": ("lambda_halo", "lambda_global")}
        if name in pairs:
            a, b = pairs[name]
            assert by_channel[a].isdisjoint(by_channel[b]), (rank, a, b)


def _channel_posts(rec: Recorder, channel: str):
    return [p for p in rec.posts if p.channel == channel and (p.sends or p.recvs)]


@pytest.mark.parametrize("algorithm, channels", [
    ("ring", ("lambda_halo", "lambda_halo_grad")),
    ("tokenring", ("lambda_q", "lambda_out", "lambda_q_grad", "lambda_dq")),
])
def test_lambda_exchanges_post_their_sends_and_receives_in_one_batch(monkeypatch, algorithm, channels):
    recs = _record(monkeypatch, lambda: _lambda(algorithm))
    for channel in channels:
        sent, got = {}, {}
        for rank, rec in recs.items():
            posts = _channel_posts(rec, channel)
            # one exchange = one post per rank with all its sends and receives: a receive posted on
            # its own ahead of the matching send would hold the communicator (NCCL runs it in order)
            assert len(posts) <= 1, (rank, channel, [(p.step, p.sends, p.recvs) for p in posts])
            for p in posts:
                sent.update({(rank, peer): n for peer, n in p.sends})
                got.update({(peer, rank): n for peer, n in p.recvs})
        assert sent and sent == got, (channel, sent, got)


def _overlaps(rec: Recorder) -> list[tuple[str, int, int]]:
    """(channel, step, kernel calls between the post and its wait) of every post."""
    kernels_before, pos = [], {}
    n = 0
    for ev in rec.events:
        if ev[0] == "kernel":
            n += 1
        elif ev[0] == "post":
            pos[ev[1].id] = (ev[1], n)
        elif ev[0] == "wait" and ev[1] in pos:
            p, at = pos.pop(ev[1])
            kernels_before.append((p.channel, p.step, n - at))
    return kernels_before


@pytest.mark.parametrize("topology", ["ring", "full"])
def test_every_tokenring_transfer_overlaps_a_kernel_call_but_the_last_relayed_one(monkeypatch, topology):
    from ringrt.schedules import tokenring_plan

    monkeypatch.setattr(tokenring_plan, "SPLIT_MIN_SCORES", 0)  # these shards are tiny: split the own block all the same
    world = 3
    for rank, rec in _record(monkeypatch, lambda: _attention("tokenring", s=12, topology=topology), world=world).items():
        spans = _overlaps(rec)
        assert spans
        # forward and backward each run steps 0..W-1; in the relay topology nothing is left to compute
        # after the last one, in the full one the second head half of the own block runs under the last return
        idle = [(c, s) for c, s, k in spans if k == 0 and (topology == "full" or s < world - 1)]
        assert not idle, (rank, topology, "transfers that overlap no compute", idle)


def _fail(monkeypatch, error: BaseException, *, nccl: bool, coalesce: bool = True):
    rec = Recorder().install(monkeypatch, nccl=nccl)
    rec.coalesce = coalesce
    with fake_rank(1, 4):
        chan = comm.P2P(dist.new_group([0, 1, 2, 3]), "q", timeout=1.5)
        pending = chan.post(step=3, sends=[(0, torch.zeros(8, dtype=torch.uint8))], recvs=[(2, 8)])
        rec.fail_with = error
        with pytest.raises(RuntimeError) as info:
            pending.wait()
    return info.value, rec


NCCL_TIMEOUT = "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=COALESCED) ran for 600002 milliseconds before timing out."
NCCL_ERROR = "NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error, NCCL version 2.21.5"
GLOO_TIMEOUT = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 1500ms for recv operation to complete"
GLOO_CLOSED = "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:17795"


def test_a_failed_coalesced_batch_names_all_its_peers_and_is_not_called_a_timeout(monkeypatch):
    err, rec = _fail(monkeypatch, RuntimeError(NCCL_ERROR), nccl=True)
    msg = str(err)
    assert "rank 1 (of 4) on channel 'q', step 3" in msg
    assert "send to peer 0, receive from peer 2" in msg and "any of ranks 0, 2" in msg, msg
    assert "connection to the peer was closed" in msg and "did not complete within" not in msg, msg
    assert type(err).__name__ == "CommError" and not isinstance(err, comm.CommTimeout), msg
    assert _p2p_waits(rec) == [None]  # the one coalesced work, waited stream-ordered

    err, _ = _fail(monkeypatch, RuntimeError(NCCL_TIMEOUT), nccl=True)
    msg = str(err)
    assert "send to peer 0, receive from peer 2" in msg and "process group's timeout" in msg, msg
    assert isinstance(err, comm.CommTimeout), msg


def test_gloo_keeps_per_transfer_timeouts_and_tells_a_closed_connection_from_a_timeout(monkeypatch):
    err, rec = _fail(monkeypatch, RuntimeError(GLOO_TIMEOUT), nccl=False)
    assert isinstance(err, comm.CommTimeout)
    # gloo posts the receive first (see test_gloo_posts_every_receive_before_its_sends), so it is waited first
    assert "rank 1 (of 4) on channel 'q', step 3: receive from peer 2 did not complete within 1.5 s" in str(err), str(err)
    assert rec.direct == ["recv", "send"] and _p2p_waits(rec) == [datetime.timedelta(seconds=1.5)]

    err, _ = _fail(monkeypatch, RuntimeError(GLOO_CLOSED), nccl=False)
    assert "receive from peer 2 failed: the connection to the peer was closed" in str(err), str(err)
    assert type(err).__name__ == "CommError" and not isinstance(err, comm.CommTimeout), str(err)


@pytest.mark.parametrize("name", [n for n in CALLS if n not in ("allgather", "ulysses")])
def test_gloo_posts_every_receive_before_its_sends(monkeypatch, name):
    """gloo runs an exchange with one peer half-duplex when the send is posted before the receive
    (Note [NCCL and gloo]): every post issues its irecvs first, then its isends, and on every channel
    a rank's first receive from a peer is posted before its first send to that peer."""
    both = 0
    for rank, rec in _record(monkeypatch, CALLS[name], nccl=False).items():
        at, first = 0, {}
        for i, p in enumerate(rec.posts):
            n_recv, n_send = len(p.recvs), len(p.sends)
            got = rec.direct[at : at + n_recv + n_send]
            assert got == ["recv"] * n_recv + ["send"] * n_send, (rank, p.channel, p.step, got)
            at += n_recv + n_send
            both += bool(n_recv and n_send)
            for kind, ops in (("recv", p.recvs), ("send", p.sends)):
                for peer, _ in ops:
                    first.setdefault((p.channel, kind, peer), i)
        assert at == len(rec.direct), (rank, name)
        late = [(ch, peer) for (ch, kind, peer), i in first.items()
                if kind == "send" and first.get((ch, "recv", peer), i) > i]
        assert not late, (rank, name, "sent to before receiving from", late)
    # TokenRing posts its receives ahead in posts of their own; the others pair them in one post
    assert both or name.startswith("tokenring") and "topology" not in name, name


def _subgroups():
    return [dist.new_group([0, 1]), dist.new_group([2, 3])]


@pytest.mark.parametrize("call", ["tokenring", "ring", "hybrid", "lambda"])
def test_an_nccl_subgroup_without_dedicated_groups_fails_on_every_rank_before_any_transfer(monkeypatch, call):
    rec = Recorder().install(monkeypatch, nccl=True)
    for rank in range(4):
        with fake_rank(rank, 4):
            mine = _subgroups()[rank // 2]
            with pytest.raises(ValueError, match=r"subgroup on NCCL without dedicated direction groups.*new_subgroups.*register"):
                _lambda("ring", group=mine) if call == "lambda" else _attention(call, group=mine)
            assert not rec.posts and not rec.direct, (rank, call)
            # the collectives-only schedules need nothing more than the subgroup itself
            _attention("allgather", group=mine)
        rec.take()


def test_gloo_subgroups_still_share_their_group_with_tags(monkeypatch):
    rec = Recorder().install(monkeypatch, nccl=False)
    with fake_rank(1, 4):
        mine = _subgroups()[0]
        _attention("tokenring", group=mine)
    assert {id(p.group) for p in rec.posts} == {id(mine)}
    assert {p.channel for p in rec.posts} == {"q", "out"}


MESH_CALLS = {
    "tokenring": lambda g: _attention("tokenring", group=g),
    "ring": lambda g: _attention("ring", group=g),
    "hybrid": lambda g: _attention("hybrid", group=g),  # sp = 4: Ulysses pairs x a 2-member ring
    "lambda_tokenring": lambda g: _lambda("tokenring", group=g),
}


@pytest.mark.parametrize("name", list(MESH_CALLS))
def test_mesh_gives_each_sequence_group_dedicated_communicators(monkeypatch, name):
    recorder = Recorder().install(monkeypatch, nccl=True)
    for rank in (0, 6):
        with fake_rank(rank, 8):
            seq, data, replica, sp = parallel.mesh(2)
            assert (replica, sp) == (rank // 4, 4)
            assert dist.get_process_group_ranks(seq) == list(range(rank // 4 * 4, rank // 4 * 4 + 4))
            MESH_CALLS[name](seq)
        rec = recorder.take()
        assert rec.posts
        other = [x for x in rec.shared if x[0] != x[1]]  # one channel's own posts queue in order (see above)
        assert not other, (rank, name, other)
        assert all(p.group is not seq for p in rec.posts), (rank, name, "P2P on the sequence group itself")
        assert not [t for _, t in rec.waits if t is not None]


def _agree(monkeypatch, backend: str) -> Recorder:
    rec = Recorder().install(monkeypatch, nccl=False)
    with fake_rank(0, 2):
        monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
        agree_fields(dist.group.WORLD, 0, 2, None, [("heads", 4.0)], "ringrt.attention", 7.0, torch.device("cpu"))
        monkeypatch.undo()
    return rec


def test_the_input_agreement_stays_on_the_cpu_and_never_blocks_the_host_on_nccl(monkeypatch):
    mixed = dist.Backend("cpu:gloo,cuda:nccl")
    # the launcher's NCCL jobs: CPU tensors go over the gloo half, so the metadata never touches the GPU
    rec = _agree(monkeypatch, mixed)
    assert rec.collective_devices == [torch.device("cpu")]
    assert [t for what, t in rec.waits if what == "all_gather"] == [datetime.timedelta(seconds=7.0)]  # gloo: bounded
    # a plain NCCL group: no timeout argument (it would busy-poll the host and abort the communicator)
    rec = _agree(monkeypatch, dist.Backend("nccl"))
    assert [t for what, t in rec.waits if what == "all_gather"] == [None]


def test_backend_decisions(monkeypatch):
    with fake_rank(0, 2):
        for backend, cuda_nccl, cpu_meta in (("cpu:gloo,cuda:nccl", True, "cpu"), ("nccl", True, "cuda"), ("gloo", False, "cpu")):
            monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: dist.Backend(b))
            assert comm.is_nccl(None, torch.device("cuda")) is cuda_nccl, backend
            assert comm.is_nccl(None, torch.device("cpu")) is (backend == "nccl"), backend
            assert comm.metadata_device(None, torch.device("cuda")).type == cpu_meta, backend
        monkeypatch.undo()
    assert comm.failure_kind(RuntimeError(NCCL_TIMEOUT)) == "timeout"
    assert comm.failure_kind(RuntimeError(GLOO_TIMEOUT)) == "timeout"
    assert comm.failure_kind(RuntimeError(GLOO_CLOSED)) == "closed"
    assert comm.failure_kind(RuntimeError("Application timeout caused pair closure")) == "closed"
    assert comm.failure_kind(RuntimeError(NCCL_ERROR)) == "closed"
    assert issubclass(comm.CommTimeout, comm.CommError) and issubclass(comm.CommError, RuntimeError)


def test_register_rejects_shared_groups():
    with fake_rank(0, 2):
        g, q = dist.new_group([0, 1]), dist.new_group([0, 1])
        with pytest.raises(ValueError, match="three different groups"):
            groups.register(g, lanes=(q, q))
