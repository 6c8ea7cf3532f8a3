"""Files a distributed run writes: one shared output directory, rank 0 writes, every write atomic.

Under torchrun, Slurm or MPI every rank gets the same ``out_dir`` (the launcher passes it, e.g.
``hydra.run.dir``); only the process with global rank 0 writes configs, logs and results there.
A write goes to a temporary file in the same directory and is then renamed over the target with
``os.replace``, so a reader (or a kill at any moment) sees either the old file or the new one,
never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .launcher import global_rank


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file + fsync + ``os.replace`` (creates parents)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def is_writer() -> bool:
    """True on the one process that writes shared files (global rank 0, or a single process)."""
    return global_rank() == 0
