"""Run a function on W gloo processes and collect what each returns; time out instead of hanging."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

_CTX = mp.get_context("spawn")


def _worker(fn, rank, world, init_file, queue, args):
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()
        os._exit(0)  # skip interpreter teardown, where gloo threads can abort the process


def run(fn, world: int, *args, timeout: float = 240.0) -> list:
    """fn(rank, world, *args) on ``world`` processes; returns the results indexed by rank.

    fn must be importable (module level). A worker that raises fails the caller with its
    traceback; workers still running after ``timeout`` seconds are killed and the caller fails.
    """
    fd, init_file = tempfile.mkstemp(prefix="ringrt_pg_")
    os.close(fd)
    os.unlink(init_file)
    queue = _CTX.Queue()
    procs = [_CTX.Process(target=_worker, args=(fn, r, world, init_file, queue, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    import queue as _q
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{world - len(results) - len(errors)} of {world} workers did not finish within {timeout:g} s")
            try:
                rank, status, payload = queue.get(timeout=min(left, 1.0))
            except _q.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    raise RuntimeError(f"worker(s) {dead} died without reporting")
                continue
            if status == "ok":
                results[rank] = payload
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
        raise AssertionError("worker failure:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
