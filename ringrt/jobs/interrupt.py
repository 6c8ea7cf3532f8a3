"""Ctrl-C and SIGTERM: every rank stops with one line and exit code 128 + the signal (130 for Ctrl-C).

Who gets the signal: a terminal's Ctrl-C goes to its foreground process group. torchrun starts its
workers in sessions of their own, so there the agent gets it and forwards it to each rank (then
waits 30 s before SIGKILL); under ``python``, mpirun or ``ringrt demo`` the ranks get it directly.
Slurm's ``scancel`` and a torchrun agent stopping its workers send SIGTERM.

* :func:`stops_cleanly` wraps a job's entry point: the first SIGINT/SIGTERM becomes a
  KeyboardInterrupt; the rank prints one line, e.g. ::

      rank 1/2: interrupted after step 36; last checkpoint step 30 in /runs/x/checkpoints; resume with: <command>

  destroys its process group and leaves with ``os._exit`` (no tracebacks; no interpreter teardown,
  where gloo threads can abort a process). Further signals (the agent forwards the one the terminal
  already sent) are ignored. The ranks do not stop at the same instant: a peer that stopped first
  makes this rank's collective fail before its own signal has been handled, so an error while a
  SIGINT is on its way (:data:`GRACE_S`) counts as the interruption, not as a crash.
* :func:`deferred` holds signals off while a checkpoint is saved and delivers them when the save
  has finished (or failed as a whole: saves are atomic, the previous checkpoint stays).
* :func:`note` lets the job say where it is (step, checkpoint directory, the arguments that resume it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 1.0
"""How long a rank whose collective failed waits for its own SIGINT before calling the failure an error."""

_received: int | None = None
_notes: dict = {}


def note(**where) -> None:
    """Record where the job is, for the interruption line: ``step`` (steps done), ``checkpoints``
    (directory of the job's checkpoints), ``resume`` (arguments to append to the command to resume)."""
    _notes.update(where)


def received() -> int | None:
    """The signal that is stopping this process, or None."""
    return _received


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_signal(signum, frame) -> None:
    global _received
    if _received is not None:
        return  # already stopping (Ctrl-C twice, or the agent forwarding what the terminal sent)
    _received = signum
    raise KeyboardInterrupt


def _deliver(signum: int, handler) -> None:
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run the block without being interrupted by SIGINT/SIGTERM; one received meanwhile is delivered
    (to the handler that was in place) when the block ends. Only in the main thread (elsewhere a no-op)."""
    if not _main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if held:
            _deliver(held[0], previous[held[0]])


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _wait_for_signal(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    try:
        while _received is None and time.monotonic() < deadline:
            time.sleep(0.02)
    except KeyboardInterrupt:
        pass


def _describe(job: str, signum: int) -> str:
    from ..run import checkpoint
    from ..distributed.launcher import detect, launch_command

    env = detect()
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    parts = [f"rank {env.rank}/{env.world_size}: {job} {what}"]
    if "step" in _notes:
        parts[0] += f" after step {_notes['step']}"
    if "checkpoints" in _notes:
        root = os.path.abspath(_notes["checkpoints"])
        last = checkpoint.latest(root)
        parts.append(f"last checkpoint step {int(last.name.split('_')[1])} in {root}" if last
                     else f"no checkpoint yet in {root}")
    if "resume" in _notes:
        parts.append(f"resume with: {launch_command(_notes['resume'])}")
    return "; ".join(parts)


def _leave(job: str, signum: int) -> None:
    from ..distributed.launcher import shutdown

    try:
        line = _describe(job, signum)
    except Exception as e:  # the line must not turn into a traceback
        line = f"{job} interrupted ({type(e).__name__} while describing where: {e})"
    sys.stderr.write(line + "\n")  # one write: two ranks' lines never interleave
    sys.stderr.flush()
    # Leave the process group (bounded: a peer may be gone) and flush logs, then exit without teardown.
    done = threading.Thread(target=shutdown, daemon=True)
    done.start()
    done.join(timeout=5.0)
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def stops_cleanly(job: str) -> Iterator[None]:
    """Around a job's entry point (a single run, not a sweep job): SIGINT/SIGTERM end the process with
    one line naming where the job was and how to resume it, exit code 128 + signal.

    Outside the main thread (no signal handlers there) a no-op.
    """
    if not _main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    try:
        yield
    except BaseException as e:
        if _received is None and not isinstance(e, KeyboardInterrupt) and _distributed():
            _wait_for_signal(GRACE_S)  # a peer may have stopped first: is our own Ctrl-C on its way?
            if _received != signal.SIGINT:
                raise  # a real failure (a SIGTERM now is the launcher stopping everyone after it)
        elif _received is None and not isinstance(e, KeyboardInterrupt):
            raise
        _leave(job, _received or signal.SIGINT)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
