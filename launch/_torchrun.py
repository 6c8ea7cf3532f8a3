"""torchrun for ``launch/run.sh``: torch's agent (``torch.distributed.run``) in this process, with
two differences.

* One node and no rendezvous endpoint: :func:`ringrt.distributed.launcher.local_torchrun_args` (a file
  rendezvous in a private temporary directory, no agent store, ``MASTER_ADDR=127.0.0.1``), so
  nothing listens beyond 127.0.0.1. ``--standalone`` would make the agent listen on every interface.
* Ctrl-C / SIGTERM: the agent forwards the signal to the ranks, each prints one line (where it
  stopped, how to resume: :mod:`ringrt.jobs.interrupt`), and this process exits 128 + signal
  without the agent's traceback and its "death signal" / "closing signal" warnings.

Everything else (failures, restarts, the error summary) is torchrun's own.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile


class _QuietOnSignal(logging.Filter):
    """Drops the agent's two warnings about a signal it got and forwards (the ranks say it)."""

    stopping = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if "death signal" in msg:
            _QuietOnSignal.stopping = True
            return False
        return not (_QuietOnSignal.stopping and "closing signal" in msg)


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun, parse_args

    from ringrt.distributed.launcher import LOCAL_TORCHRUN_ENV, local_torchrun_args

    quiet = _QuietOnSignal()
    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(quiet)
    opts = parse_args(argv)
    work = None
    if not opts.standalone and not opts.rdzv_endpoint and opts.nnodes in ("1", "1:1"):
        work = tempfile.mkdtemp(prefix="ringrt-rdzv-")  # mode 0700: only we can read or write it
        argv = [*local_torchrun_args(os.path.join(work, "rendezvous")), *argv]
        os.environ.update(LOCAL_TORCHRUN_ENV)
    try:
        torchrun(argv)
        return 0
    except SignalException as e:
        return 128 + int(e.sigval)
    except KeyboardInterrupt:  # before the agent installed its handlers
        return 130
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.pop(0)  # this directory: its train.py etc. are scripts, not modules
    sys.exit(main(sys.argv[1:]))
