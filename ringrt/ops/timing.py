"""Wall-clock timing that is right on any device.

CUDA kernels run asynchronously: ``time.perf_counter()`` around a launch measures the launch, not
the work. :func:`sync` waits for the device's queued work (a no-op on CPU), so ``sync; t0; fn();
sync; t1`` brackets the work itself. Used by ``auto``'s tuning and the GPU acceptance check.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Block until every kernel queued on ``device`` has finished (CPU and meta: nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes on ``device``, its queued device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def best_of(fn: Callable[[], object], device: torch.device, *, reps: int, warmup: int = 1) -> float:
    """Fastest of ``reps`` timed calls after ``warmup`` untimed ones (timeit's advice: the minimum is
    the run least disturbed by the rest of the machine)."""
    for _ in range(warmup):
        fn()
    return min(elapsed(fn, device) for _ in range(max(1, reps)))
