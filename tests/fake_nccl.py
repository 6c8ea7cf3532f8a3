"""Drive ringrt's NCCL code path on a CPU box: torch's ``fake`` process group (collectives and P2P
return at once) treated as NCCL, with every P2P post, batch, wait and kernel call recorded.

One process plays one rank at a time (``fake_rank(rank, world)``): the fake group hands back
whatever it is given, so values are meaningless, but which transfers a rank posts, on which group,
in which batch and in what order relative to its kernel calls is exactly what the real run does.

``Recorder().install(monkeypatch, nccl=True)`` (once per test: installs do not stack) makes every
group report the "nccl" backend to ringrt (``dist.get_backend``, which ``ringrt.distributed.comm.is_nccl``
reads; torch's own group creation is untouched) and replaces ``batch_isend_irecv`` by one that,
like ProcessGroupNCCL, returns ONE coalesced work per batch; ``take()`` hands over what was recorded.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.testing._internal.distributed.fake_pg import FakeStore

from ringrt.distributed import comm, groups
from ringrt.lm_infinite import attention as lambda_api
from ringrt.schedules import call as attention_call


@contextlib.contextmanager
def fake_rank(rank: int, world: int):
    """A fake default group in which this process is ``rank`` of ``world``."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        groups.clear_cache()


@dataclass
class Post:
    """One ``P2P.post`` call: what this rank sent and received, on which group."""

    id: int
    channel: str
    group: object
    step: int
    sends: list[tuple[int, int]]  # (peer, bytes)
    recvs: list[tuple[int, int]]
    batches: list[list[tuple[str, int, object]]] = field(default_factory=list)  # [(kind, group peer, P2POp group)]


class Work:
    """A recorded work; a P2P one raises the recorder's ``fail_with`` (if set) when waited on."""

    def __init__(self, rec: "Recorder", what: str, inner=None):
        self.rec, self.what, self.inner = rec, what, inner

    def wait(self, timeout=None):
        self.rec.waits.append((self.what, timeout))
        if self.what.startswith("p2p") and self.rec.fail_with is not None:
            raise self.rec.fail_with
        return self.inner.wait() if self.inner is not None else True


class Recorder:
    def __init__(self):
        self.events: list[tuple] = []  # ("post", Post) | ("wait", post id) | ("kernel", "forward"/"backward")
        self.posts: list[Post] = []
        self.waits: list[tuple[str, object]] = []  # (what, timeout) of every work waited on
        self.direct: list[str] = []  # plain isend/irecv calls
        self.shared: list[tuple[str, str, int]] = []  # (channel posted, channel in flight on the same group, step)
        self.inflight: list[Post] = []
        self.collective_devices: list[torch.device] = []
        self.fail_with: BaseException | None = None  # raised when a P2P work is waited on
        self.coalesce = True
        self._current: Post | None = None
        self._ids = itertools.count()

    # ---- installation ------------------------------------------------------------------------

    def install(self, monkeypatch, *, nccl: bool) -> "Recorder":
        self._record_channels(monkeypatch)
        self._record_transfers(monkeypatch, nccl=nccl)
        self._record_collectives(monkeypatch, nccl=nccl)
        self._record_kernels(monkeypatch)
        return self

    def _record_channels(self, monkeypatch) -> None:
        """``P2P.post`` and ``Pending.wait``: what each post moves, and which posts are in flight."""
        rec = self
        real_post, real_wait = comm.P2P.post, comm.Pending.wait

        def post(self_, **kw):
            p = Post(next(rec._ids), self_.name, self_.group, kw["step"],
                     [(peer, buf.numel()) for peer, buf in kw.get("sends", ())], list(kw.get("recvs", ())))
            if p.sends or p.recvs:
                rec.shared += [(p.channel, q.channel, p.step) for q in rec.inflight if q.group is p.group]
                rec.inflight.append(p)
            rec.posts.append(p)
            rec.events.append(("post", p))
            rec._current = p
            try:
                pending = real_post(self_, **kw)
            finally:
                rec._current = None
            pending._recorded = p
            return pending

        def wait(self_):
            p = getattr(self_, "_recorded", None)
            if p is not None:
                rec.events.append(("wait", p.id))
                rec.inflight = [q for q in rec.inflight if q is not p]
            return real_wait(self_)

        monkeypatch.setattr(comm.P2P, "post", post)
        monkeypatch.setattr(comm.Pending, "wait", wait)

    def _record_transfers(self, monkeypatch, *, nccl: bool) -> None:
        """Plain isend/irecv, and on NCCL ``batch_isend_irecv`` answered like ProcessGroupNCCL."""
        rec = self
        real_isend, real_irecv = dist.isend, dist.irecv
        real_batch = dist.batch_isend_irecv

        def direct(fn, kind):
            def call(tensor, *a, **kw):
                rec.direct.append(kind)
                work = fn(tensor, *a, **kw)
                return Work(rec, f"p2p {kind}", work)
            return call

        isend, irecv = direct(real_isend, "send"), direct(real_irecv, "recv")

        def batch(ops):
            p = rec._current
            kinds = [("send" if op.op is isend else "recv", op.group_peer, op.group) for op in ops]
            if p is not None:
                p.batches.append(kinds)
            for op in ops:
                if op.op is irecv:
                    op.tensor.zero_()  # finite values for the kernels
            if rec.coalesce:  # ProcessGroupNCCL: one coalesced work for the whole batch
                return [Work(rec, "p2p batch")]
            return [Work(rec, "p2p batch") for _ in ops]

        # P2POp checks its op against c10d.isend/irecv: patch both names to the same wrapper
        for mod in (dist, c10d):
            monkeypatch.setattr(mod, "isend", isend)
            monkeypatch.setattr(mod, "irecv", irecv)
        monkeypatch.setattr(dist, "batch_isend_irecv", batch if nccl else real_batch)

    def _record_collectives(self, monkeypatch, *, nccl: bool) -> None:
        """The device of every all_gather / all_to_all_single / reduce_scatter, and the backend name."""
        rec = self
        real_all_gather, real_a2a, real_rs = dist.all_gather, dist.all_to_all_single, dist.reduce_scatter

        def collective(fn, name):
            def call(*a, **kw):
                rec.collective_devices.append(a[1].device if name == "all_gather" else a[0].device)
                work = fn(*a, **kw)
                return Work(rec, name, work) if kw.get("async_op") else work
            return call

        monkeypatch.setattr(dist, "all_gather", collective(real_all_gather, "all_gather"))
        monkeypatch.setattr(dist, "all_to_all_single", collective(real_a2a, "all_to_all_single"))
        monkeypatch.setattr(dist, "reduce_scatter", collective(real_rs, "reduce_scatter"))
        if nccl:  # what a ProcessGroupNCCL group reports; ringrt.distributed.comm.backend_for/is_nccl read it
            monkeypatch.setattr(dist, "get_backend", lambda group=None: dist.Backend("nccl"))

    def _record_kernels(self, monkeypatch) -> None:
        """Every kernel call, forward or backward, as an event between the posts and waits."""
        rec = self

        def kernels(get):
            def make(*a, **kw):
                return _RecordingKernel(get(*a, **kw), rec)
            return make

        monkeypatch.setattr(attention_call, "get_kernel", kernels(attention_call.get_kernel))
        monkeypatch.setattr(lambda_api, "get_kernel", kernels(lambda_api.get_kernel))

    def take(self) -> "Recorder":
        """What was recorded so far, as a separate object; this recorder starts afresh (still installed)."""
        got = Recorder()
        for name in ("events", "posts", "waits", "direct", "shared", "inflight", "collective_devices"):
            setattr(got, name, getattr(self, name))
            setattr(self, name, [])
        return got


class _RecordingKernel:
    def __init__(self, inner, rec: Recorder):
        self.inner, self.rec, self.name = inner, rec, inner.name

    def forward(self, *a, **kw):
        self.rec.events.append(("kernel", "forward"))
        return self.inner.forward(*a, **kw)

    def backward(self, *a, **kw):
        self.rec.events.append(("kernel", "backward"))
        return self.inner.backward(*a, **kw)
