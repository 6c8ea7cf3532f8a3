"""Run a function on W local processes joined by a process group (benchmarks, tests, demos).

gloo by default; ``backend="cpu:gloo,cuda:nccl"`` gives each process its own GPU (rank modulo the
visible GPUs) and NCCL for CUDA tensors, gloo for CPU ones.

No store port: the processes meet through a ``file://`` store, and their gloo (and NCCL) sockets
listen on the loopback interface only (:func:`ringrt.distributed.launcher.pin_to_loopback`). Results come back
through a queue; a worker that raises fails the caller with its traceback, and workers still
running after ``timeout`` seconds are killed so a deadlock becomes an error instead of a hang.

``enter``: a picklable callable run in each process with its rank after the loopback pinning and
before ``init_process_group``, e.g. to move the rank into a network namespace of its own and point
``GLOO_SOCKET_IFNAME`` at that namespace's interface (``ringrt.simulate.links``). Without one
``run_local`` uses the hook of the innermost :func:`entering` block, if any.
"""

from __future__ import annotations

import io
import os
import queue as _queue
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.multiprocessing as mp

_CTX = mp.get_context("spawn")
_ENTER: list[Callable[[int], None]] = []  # the hooks of the open entering() blocks, innermost last


@contextmanager
def entering(hook: Callable[[int], None]) -> Iterator[None]:
    """Within the block, ``run_local`` calls without ``enter=`` run ``hook(rank)`` in each process
    before it joins the group (benchmarks whose inner helpers spawn ranks themselves)."""
    _ENTER.append(hook)
    try:
        yield
    finally:
        _ENTER.remove(hook)


def _hook(enter):
    return enter if enter is not None or not _ENTER else _ENTER[-1]


def _worker(fn, rank, world, init_file, q, args, threads, backend, enter=None):
    try:
        torch.set_num_threads(threads)
        import torch.distributed as dist

        from .launcher import pin_to_loopback

        pin_to_loopback()  # every rank is on this machine: gloo/NCCL listen on loopback only
        if enter is not None:
            enter(rank)  # e.g. into this rank's network namespace: after the pinning, so it may override it
        extra = {}
        if "nccl" in backend:
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
            extra["device_id"] = device
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world, **extra)
        result = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(result, buf)  # by value: shared-memory tensors would die with this process
        q.put((rank, "ok", buf.getvalue()))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report everything, assertion errors included, to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()
        os._exit(0)  # skip interpreter teardown, where gloo threads can abort the process


def run_local(fn, world: int, *args, timeout: float = 240.0, threads: int = 1, backend: str = "gloo",
              enter: Callable[[int], None] | None = None) -> list:
    """fn(rank, world, *args) on ``world`` processes (``threads`` intra-op threads each) joined by
    ``backend`` (``gloo``, or ``cpu:gloo,cuda:nccl`` for one GPU per process). ``enter(rank)`` (default:
    the innermost :func:`entering` hook) runs in each process before it joins the group.

    ``fn`` must be importable (module level) and return something picklable. Returns the results
    indexed by rank.
    """
    fd, init_file = tempfile.mkstemp(prefix="ringrt_pg_")
    os.close(fd)
    os.unlink(init_file)
    q = _CTX.Queue()
    enter = _hook(enter)
    procs = [_CTX.Process(target=_worker, args=(fn, r, world, init_file, q, args, threads, backend, enter), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{world - len(results) - len(errors)} of {world} workers did not finish within {timeout:g} s")
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except _queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    codes = [procs[r].exitcode for r in dead]
                    raise RuntimeError(f"worker(s) {dead} died without reporting (exit codes {codes})") from None
                continue
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                if len(errors) == 1:
                    deadline = min(deadline, time.monotonic() + 30)  # let the others report or time out
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        if os.path.exists(init_file):
            os.unlink(init_file)
    if errors:
        raise RuntimeError("worker failure:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]


def makespans(per_rank: list[list[tuple[float, float]]]) -> list[float]:
    """Wall time of each repetition of a distributed call timed on one host: the last rank's end minus
    the first rank's start. ``per_rank[r][i]`` is rank r's (start, end) of repetition i from
    ``time.perf_counter()``, which reads CLOCK_MONOTONIC, a clock every process of the host shares.
    (A rank's own elapsed time is not enough when ranks share cores: one that is scheduled late
    starts its clock late.)"""
    return [max(r[i][1] for r in per_rank) - min(r[i][0] for r in per_rank) for i in range(len(per_rank[0]))]
