"""Faults and bad settings: every rank raises a clear error within seconds, none hangs.

* ``timeout`` must be a positive finite number of seconds or None: anything else is a ValueError
  on every rank before any transfer (0 used to mean "wait forever", -1 an instant "timeout").
* ``RINGRT_P2P_TIMEOUT`` is checked when ringrt is imported, with an error naming the variable.
* A rank that gives up on the input agreement (its timeout ran out while another rank was late)
  cannot leave the late rank blocked in the setup of the ring groups.
* Whether autograd will need a backward is part of the cross-rank agreement.
* A rank that dies inside a collective or a ring transfer (Ulysses, all-gather, TokenRing, the
  loss all-reduce), or stalls and wakes up after its peer gave up, makes the survivors raise
  ``CommError`` naming their rank, the peer or the collective, the channel, the step and that the
  connection was closed, never a raw backend error and never a claim that they waited longer than
  they did.

Each spawn uses :func:`tests.fault_util.run_faulty`: ranks exit as soon as they report, as a real
job's processes do after an error, and a rank still running after its timeout counts as hung.
"""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import ringrt
from ringrt.distributed import comm
from ringrt.lm_infinite import LambdaMask
from tests.fault_util import caught, run_faulty

# Survivors must raise within this many seconds of the fault (timeouts here are 2 s).
PROMPT_S = 10.0


def _qkv(seed: int, s: int = 8, heads: int = 2, kv_heads: int = 2, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, s, h, 4, generator=g).requires_grad_(grad) for h in (heads, kv_heads, kv_heads)]


def _moved() -> dict:
    return {name: (c.bytes_sent, c.bytes_recv, c.sends, c.recvs) for name, c in comm.stats().items()}


# ----------------------------------------------------------------------------------------------
# timeout values
# ----------------------------------------------------------------------------------------------

BAD_TIMEOUTS = {"zero": 0, "negative": -1, "nan": math.nan, "inf": math.inf, "string": "3", "bool": True}


def _worker_bad_timeouts(rank, world):
    res = {}
    q, k, v = _qkv(rank)
    mask = LambdaMask(n_global=2, n_local=3)
    for name, bad in BAD_TIMEOUTS.items():
        comm.reset_stats()
        res[f"attention_{name}"] = (caught(lambda bad=bad: ringrt.attention(q, k, v, timeout=bad)), _moved())
    for name in ("zero", "negative"):
        comm.reset_stats()
        bad = BAD_TIMEOUTS[name]
        res[f"lambda_{name}"] = (caught(lambda bad=bad: ringrt.lambda_attention(q, k, v, mask=mask, timeout=bad)), _moved())
    # only one rank passes a bad value: the others must not be left waiting for it
    comm.reset_stats()
    res["rank1_only"] = (caught(lambda: ringrt.attention(q, k, v, timeout=0 if rank == 1 else 30)), _moved())
    comm.reset_stats()
    res["lambda_rank1_only"] = (caught(lambda: ringrt.lambda_attention(q, k, v, mask=mask, timeout=-2 if rank == 1 else 30)), _moved())
    res["p2p"] = caught(lambda: comm.P2P(dist.group.WORLD, "q", timeout=0))
    # nothing was left half-done: a good call still works
    res["after"] = caught(lambda: ringrt.attention(q, k, v, timeout=30))
    return res


@pytest.mark.timeout(60)
def test_a_bad_timeout_is_a_value_error_on_every_rank_before_any_transfer():
    results = run_faulty(_worker_bad_timeouts, 2, timeout=40)
    for rank, res in enumerate(results):
        assert "hung" not in res and "raised" not in res and "died" not in res, (rank, res)
        for name in [*(f"attention_{n}" for n in BAD_TIMEOUTS), "lambda_zero", "lambda_negative", "rank1_only", "lambda_rank1_only"]:
            err, moved = res[name]
            assert err.get("type") == "ValueError", (rank, name, err)
            assert "timeout=" in err["msg"] and "positive finite number of seconds or None" in err["msg"], (rank, name, err["msg"])
            assert not moved, (rank, name, "transfers before the error", moved)
        assert "timeout=0 " in res["attention_zero"][0]["msg"] and "timeout='3'" in res["attention_string"][0]["msg"]
        assert "invalid input on rank 1: timeout=0 " in res["rank1_only"][0]["msg"], res["rank1_only"][0]["msg"]
        assert res["p2p"].get("type") == "ValueError" and "timeout=0" in res["p2p"]["msg"], res["p2p"]
        assert res["after"].get("ok"), (rank, res["after"])


def test_a_bad_timeout_is_a_value_error_on_a_single_process():
    q, k, v = _qkv(0)
    for bad in BAD_TIMEOUTS.values():
        with pytest.raises(ValueError, match=r"timeout=.* must be a positive finite number of seconds or None"):
            ringrt.attention(q, k, v, timeout=bad)
        with pytest.raises(ValueError, match=r"timeout=.* must be a positive finite number of seconds or None"):
            ringrt.lambda_attention(q, k, v, mask=LambdaMask(n_global=2, n_local=3), timeout=bad)
    ringrt.attention(q, k, v, timeout=2)  # a positive int is fine


def test_a_bad_RINGRT_P2P_TIMEOUT_names_the_variable():
    env = dict(os.environ, RINGRT_P2P_TIMEOUT="abc")
    proc = subprocess.run([sys.executable, "-c", "import ringrt"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ValueError: RINGRT_P2P_TIMEOUT='abc' must be a positive number of seconds" in proc.stderr, proc.stderr[-2000:]
    assert "could not convert" not in proc.stderr


@pytest.mark.parametrize("raw", ["0", "-5", "nan", "inf", " "])
def test_RINGRT_P2P_TIMEOUT_rules(monkeypatch, raw):
    monkeypatch.setenv("RINGRT_P2P_TIMEOUT", raw)
    if raw.strip():
        with pytest.raises(ValueError, match=rf"RINGRT_P2P_TIMEOUT={raw!r} must be a positive number of seconds"):
            comm.timeout_from_env()
    else:
        assert comm.timeout_from_env() == 300.0  # blank is unset
    monkeypatch.setenv("RINGRT_P2P_TIMEOUT", "12.5")
    assert comm.timeout_from_env() == 12.5


# ----------------------------------------------------------------------------------------------
# the input agreement
# ----------------------------------------------------------------------------------------------


def _worker_late_rank(rank, world):
    q, k, v = _qkv(rank)
    if rank == 0:
        time.sleep(2.5)  # the store host arrives after rank 1's timeout ran out
    err = caught(lambda: ringrt.attention(q, k, v, timeout=2))
    if rank == 1:
        time.sleep(4)  # stays alive (its connections open) while rank 0 finds out
    return err


@pytest.mark.timeout(60)
def test_a_rank_that_gave_up_on_the_agreement_never_leaves_another_blocked():
    results = run_faulty(_worker_late_rank, 2, timeout=30)
    for rank, err in enumerate(results):
        assert "hung" not in err, f"rank {rank} blocked (before the fix: in dist.new_group until the process-group timeout)"
        assert err.get("comm_error"), (rank, err)
        assert f"rank {rank} (of 2)" in err["msg"], (rank, err["msg"])
        assert err["after"] < PROMPT_S, (rank, err)
    # rank 1 really waited its 2 s; rank 0 (late) learns it at the next bounded step
    gave_up = results[1]["msg"]
    assert gave_up.startswith("ringrt.attention: rank 1 (of 2), checking the inputs with the other ranks: the all_gather "
                              "of every rank's input summary did not complete within 2 s (waited 2."), gave_up
    assert "did every rank of the group call it?" in results[1]["msg"]


def _worker_requires_grad(rank, world):
    res = {}
    cases = {
        "attention": lambda q, k, v: ringrt.attention(q, k, v, timeout=30),
        "lambda": lambda q, k, v: ringrt.lambda_attention(q, k, v, mask=LambdaMask(n_global=2, n_local=3), timeout=30),
    }
    for name, call in cases.items():
        comm.reset_stats()
        q, k, v = _qkv(rank, grad=rank == 0)  # only rank 0's inputs need gradients
        res[name] = (caught(lambda call=call, q=q, k=k, v=v: call(q, k, v).sum().backward() if q.requires_grad else call(q, k, v)),
                     _moved())
        comm.reset_stats()
        q, k, v = _qkv(rank, grad=True)
        with torch.set_grad_enabled(rank == 1):  # grad mode off on rank 0 only
            res[f"{name}_no_grad"] = (caught(lambda call=call, q=q, k=k, v=v: call(q, k, v)), _moved())
    return res


@pytest.mark.timeout(60)
def test_requires_grad_on_one_rank_only_is_a_value_error_before_any_transfer():
    results = run_faulty(_worker_requires_grad, 2, timeout=40)
    for rank, res in enumerate(results):
        assert "hung" not in res and "raised" not in res, (rank, res)
        for name, (err, moved) in res.items():
            assert err.get("type") == "ValueError", (rank, name, err)
            assert "the ranks disagree on requires_grad" in err["msg"], (rank, name, err["msg"])
            assert "rank 0: True, rank 1: False" in err["msg"] or "rank 0: False, rank 1: True" in err["msg"], err["msg"]
            assert err["after"] < PROMPT_S and not moved, (rank, name, err, moved)


# ----------------------------------------------------------------------------------------------
# a rank dies mid-transfer
# ----------------------------------------------------------------------------------------------


def _die(*args, **kwargs):
    os._exit(17)


def _worker_death(rank, world, what):
    """Rank 1 exits at the moment named by ``what``; rank 0 reports what it raised."""
    import ringrt.model.parallel as parallel
    import ringrt.schedules.allgather as allgather
    import ringrt.distributed.collectives as collectives

    q, k, v = _qkv(rank, heads=4, kv_heads=2, grad=True)
    if rank == 1:
        if what == "ulysses":  # inside Ulysses' first all-to-all
            collectives.all_to_all_packed = _die
        elif what == "allgather":  # inside the K/V all-gather
            allgather.all_gather = _die
        elif what == "tokenring":  # at the second step of the forward ring
            post = comm.P2P.post
            comm.P2P.post = lambda self, **kw: _die() if kw["step"] == 1 else post(self, **kw)
        elif what == "sequence_loss":  # inside the loss all-reduce
            dist.all_reduce = _die
    if what == "sequence_loss":
        logits, labels = torch.randn(1, 8, 16), torch.randint(0, 16, (1, 8))
        return caught(lambda: parallel.sequence_loss(logits, labels))
    return caught(lambda: ringrt.attention(q, k, v, algorithm=what, timeout=2).sum().backward())


DEATHS = {
    # what -> (channels the survivor may be waiting on, operation) its message must name
    "ulysses": (("'a2a'",), "all_to_all"),
    "allgather": (("'allgather'",), "all_gather"),
    "tokenring": (("'q'", "'out'"), "peer 1"),
    "sequence_loss": (("'loss'",), "all_reduce"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", list(DEATHS))
def test_a_rank_dying_mid_transfer_gives_the_survivor_a_clear_comm_error(what):
    survivor, dead = run_faulty(_worker_death, 2, what, timeout=30)
    assert dead == {"died": 17}, dead
    assert "hung" not in survivor and "raised" not in survivor, survivor
    assert survivor.get("comm_error"), survivor  # not a raw backend error
    msg = survivor["msg"]
    channels, op = DEATHS[what]
    assert any(msg.startswith("rank 0 (of 2) on channel " + c) for c in channels), msg
    assert op in msg and "step" in msg, msg
    assert "connection" in msg and "closed" in msg, msg
    assert "did not complete within" not in msg and "waited" not in msg, msg
    assert survivor["after"] < PROMPT_S, survivor


def _worker_stall(rank, world):
    """Rank 1 stalls for 4 s before its second ring step; rank 0 times out and exits meanwhile."""
    q, k, v = _qkv(rank)
    if rank == 1:
        post = comm.P2P.post

        def slow(self, **kw):
            if kw["step"] == 1:
                time.sleep(4)
            return post(self, **kw)

        comm.P2P.post = slow
    return caught(lambda: ringrt.attention(q, k, v, timeout=1.5))


@pytest.mark.timeout(60)
def test_a_stalled_rank_times_out_its_peer_and_learns_the_connection_closed_when_it_wakes():
    waiting, stalled = run_faulty(_worker_stall, 2, timeout=30)
    assert waiting.get("type") == "CommTimeout", waiting
    assert "rank 0 (of 2) on channel " in waiting["msg"] and "did not complete within 1.5 s (waited 1." in waiting["msg"], waiting
    assert stalled.get("type") == "CommError", stalled  # its first transfer after waking up, not a raw gloo error
    assert stalled["msg"].startswith("rank 1 (of 2) on channel ") and "step 1" in stalled["msg"], stalled
    assert "peer 0" in stalled["msg"] and "connection to the peer was closed" in stalled["msg"], stalled
    assert "did not complete within" not in stalled["msg"] and "waited" not in stalled["msg"], stalled


# ----------------------------------------------------------------------------------------------
# the one place that turns backend failures into CommError / CommTimeout
# ----------------------------------------------------------------------------------------------


class _FailingWork:
    def __init__(self, error: str, sleep: float = 0.0):
        self.error, self.sleep, self.timeouts = error, sleep, []

    def wait(self, timeout=None):
        self.timeouts.append(timeout)
        time.sleep(self.sleep)
        raise RuntimeError(self.error)


GLOO_CLOSED = "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:17795"


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _raised(group, work: _FailingWork, timeout_s: float) -> comm.CommError:
    with pytest.raises(comm.CommError) as info:
        comm.collective("all_reduce", lambda: work, group=group, device=torch.device("cpu"), timeout_s=timeout_s,
                        channel="loss", step="forward")
    return info.value


def test_collective_failures_say_what_happened(one_rank):
    # a closed connection is not a timeout
    work = _FailingWork(GLOO_CLOSED)
    err = _raised(one_rank, work, 7.0)
    assert type(err) is comm.CommError, err
    assert str(err).startswith("rank 0 (of 1) on channel 'loss', step forward: all_reduce failed: "
                               "the connection to a peer was closed"), str(err)
    assert work.timeouts == [datetime.timedelta(seconds=7.0)]
    # the backend says "timed out" but this wait's 300 s did not pass: not called a timeout
    err = _raised(one_rank, _FailingWork("Timed out: the previous operation on this pair", sleep=0.2), 300.0)
    assert type(err) is comm.CommError and "did not complete within" not in str(err) and "waited" not in str(err), str(err)
    assert "reported a timeout after 0.2 s, before this wait's 300 s could run out" in str(err), str(err)
    # a real timeout says how long it waited
    err = _raised(one_rank, _FailingWork("Operation timed out!", sleep=0.5), 0.5)
    assert isinstance(err, comm.CommTimeout) and "all_reduce did not complete within 0.5 s (waited 0.5 s)" in str(err), str(err)
    # 0 is not "no limit"
    with pytest.raises(ValueError, match=r"timeout=0 must be a positive finite number of seconds or None"):
        comm.collective("all_reduce", lambda: _FailingWork(GLOO_CLOSED), group=one_rank, device=torch.device("cpu"),
                        timeout_s=0, channel="loss")


class _DoneWork:
    def wait(self, timeout=None):
        return True


NCCL_ERROR = "NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error"


@pytest.mark.parametrize("works", [3, 2, 1])
def test_a_failed_nccl_batch_blames_the_peers_its_failed_work_stands_for(monkeypatch, works):
    """Rank 1 of 4 posts one batch (send to 0, receive from 2, receive from 3) and the backend hands
    back ``works`` works, the second (or only) one failing. One work per transfer: only that
    transfer's peer is blamed. Fewer: a work cannot be pinned on one transfer, so every peer is."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    batch = [_DoneWork(), _FailingWork(NCCL_ERROR), _DoneWork()][:works] if works > 1 else [_FailingWork(NCCL_ERROR)]
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: batch)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: dist.Backend("nccl"))
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        chan = comm.P2P(dist.group.WORLD, "q", timeout=2.0)
        pending = chan.post(step=5, sends=[(0, torch.zeros(8, dtype=torch.uint8))], recvs=[(2, 8), (3, 8)])
        with pytest.raises(comm.CommError) as info:
            pending.wait()
    finally:
        dist.destroy_process_group()
    msg = str(info.value)
    assert msg.startswith("rank 1 (of 4) on channel 'q', step 5: "), msg
    if works == 3:
        assert "receive from peer 2 failed" in msg and "is rank 2 alive" in msg, msg
        assert "peer 0" not in msg and "peer 3" not in msg, msg
    else:
        assert "the batched transfers (send to peer 0, receive from peer 2, receive from peer 3) failed" in msg, msg
        assert "any of ranks 0, 2, 3" in msg, msg
