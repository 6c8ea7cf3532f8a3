"""Ordinary user errors: one line per rank and exit 2, instead of a traceback.

A bad setting is a ``ValueError`` raised by ringrt's own validation, naming the setting and the
valid values. :func:`is_user_error` tells it from a ``ValueError`` raised inside torch or another
library (those keep their traceback, as does any error with ``RINGRT_DEBUG=1``); :func:`user_error`
prints it as ``<prog>: error: <message>`` and leaves the process group.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)


def is_user_error(e: BaseException) -> bool:
    """A ``ValueError`` raised by ringrt's own code (its validation of settings and inputs), not one
    from inside torch or another library; never with ``RINGRT_DEBUG=1``."""
    if not isinstance(e, ValueError) or os.environ.get("RINGRT_DEBUG", "0") not in ("", "0"):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PACKAGE_DIR + os.sep)


def user_error(prog: str, e: BaseException) -> int:
    """Print ``<prog>: error: <message>`` on one line (stderr), leave the process group (bounded: a
    peer may be gone) and return the exit code, 2."""
    import threading

    from ..distributed.launcher import shutdown

    message = " ".join(str(e).split()) or type(e).__name__
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    done = threading.Thread(target=shutdown, daemon=True)
    done.start()
    done.join(timeout=5.0)
    return 2
