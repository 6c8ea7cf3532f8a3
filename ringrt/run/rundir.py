"""Files a distributed run writes: one shared output directory, rank 0 writes, every write atomic.

Under torchrun, Slurm or MPI every rank gets the same ``out_dir`` (the launcher passes it, e.g.
``hydra.run.dir``); only the process with global rank 0 writes configs, logs and results there.
A write goes to a temporary file in the same directory and is then renamed over the target with
``os.replace``, so a reader (or a kill at any moment) sees either the old file or the new one,
never half of one. The file gets the mode a plain ``open()`` would give it (``0o666 & ~umask``,
e.g. 0644), not ``mkstemp``'s private 0600: teammates sharing a run directory can read it.

A training run's ``out_dir`` holds the model in Hugging Face format under ``hf/``;
:func:`resolve_checkpoint` turns either directory into the model's (what eval, generate and the
compression jobs accept as a checkpoint).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_opened(fd_or_path: int | str | os.PathLike) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode ``open()`` would have given it:
    ``0o666 & ~umask``. Call before renaming it into place."""
    mode = 0o666 & ~current_umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file + fsync + ``os.replace`` (creates parents)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        as_if_opened(fd)
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


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> Path:
    """``obj`` as indented JSON through :func:`atomic_write_text`; ``sort_keys=False`` keeps the
    dict's own order (a results table whose keys are lengths reads in the order it was measured)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def atomic_save_figure(fig, path: str | os.PathLike, *, dpi: int = 120, **savefig) -> str:
    """Save a matplotlib figure as ``path`` (PNG) through a temporary file + ``os.replace``; returns
    ``path``. ``savefig``: further ``Figure.savefig`` options (``bbox_inches="tight"``, ...)."""
    path = str(path)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi, **savefig)
    os.replace(tmp, path)
    return path


def resolve_checkpoint(path: str | os.PathLike) -> tuple[str, dict]:
    """(Hugging Face directory, its ``ringrt.json`` extras) for a HF directory or a training
    ``out_dir`` (whose model is in ``<out_dir>/hf``). The extras are what ``ringrt train`` recorded
    (``train_len``, ``tokenizer``, ``step``); {} for a directory written elsewhere."""
    p = Path(path)
    if not (p / "config.json").is_file() and (p / "hf" / "config.json").is_file():
        p = p / "hf"
    extra = json.loads((p / "ringrt.json").read_text()) if (p / "ringrt.json").is_file() else {}
    return str(p), extra
