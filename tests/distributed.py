"""Multi-process test helper: ``run(fn, world, *args)`` on gloo processes with a timeout."""

from __future__ import annotations

from ringrt.distributed.spawn import run_local


def run(fn, world: int, *args, timeout: float = 240.0) -> list:
    """fn(rank, world, *args) on ``world`` single-threaded gloo processes; results by rank."""
    return run_local(fn, world, *args, timeout=timeout, threads=1)
