"""Multi-process helper for fault tests: ranks that die, give up or arrive late on purpose.

``run_faulty(fn, world, *args, timeout=...)`` runs ``fn(rank, world, *args)`` on ``world`` gloo
processes (one thread each, a ``file://`` store) and returns, by rank, what ``fn`` returned, or a
marker for a rank that did not: ``{"died": exit code}`` (a death the test caused with ``os._exit``),
``{"raised": traceback}`` (``fn`` itself raised) or ``{"hung": True}`` (still running after
``timeout`` seconds; killed, so a hang fails the test instead of the suite).

Unlike :func:`ringrt.distributed.spawn.run_local`, a rank exits as soon as it has reported, without a final
barrier, as a real job's process does after an error: its connections close and the ranks still
running see that. ``fn`` should catch the error it expects and return what the test checks (the
message, how long it took).
"""

from __future__ import annotations

import os
import queue as _queue
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

_CTX = mp.get_context("spawn")


def _worker(fn, rank, world, init_file, q, args):
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        q.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        q.put((rank, "raised", traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()
        os._exit(0)  # no barrier, no teardown: the connections close now, as when a job's process exits


def run_faulty(fn, world: int, *args, timeout: float = 30.0) -> list[dict]:
    """Results of ``fn(rank, world, *args)`` by rank (see the module docstring). ``fn`` must be
    importable (module level) and return a picklable dict."""
    fd, init_file = tempfile.mkstemp(prefix="ringrt_faults_")
    os.close(fd)
    os.unlink(init_file)
    q = _CTX.Queue()
    procs = [_CTX.Process(target=_worker, args=(fn, r, world, init_file, q, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world and time.monotonic() < deadline:
            try:
                rank, status, payload = q.get(timeout=0.2)
                out[rank] = payload if status == "ok" else {"raised": payload}
            except _queue.Empty:
                for r, p in enumerate(procs):
                    if r not in out and p.exitcode not in (None, 0):
                        out[r] = {"died": p.exitcode}
    finally:
        for r, p in enumerate(procs):
            p.join(timeout=0 if r in out else 1)
            if p.is_alive():
                p.kill()
        if os.path.exists(init_file):
            os.unlink(init_file)
    return [out.get(r, {"hung": True}) for r in range(world)]


def caught(call) -> dict:
    """Run ``call()``: {"ok": True} or the error it raised as {"type", "msg", "after" (seconds)}."""
    t0 = time.monotonic()
    try:
        call()
        return {"ok": True, "after": time.monotonic() - t0}
    except Exception as e:  # the test checks which one
        return {"type": type(e).__name__, "msg": str(e), "after": time.monotonic() - t0,
                "comm_error": _is_comm_error(e)}


def _is_comm_error(e: BaseException) -> bool:
    try:
        from ringrt.distributed.comm import CommError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, CommError)
