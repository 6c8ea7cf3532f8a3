"""Where text comes from: files, directories, globs or JSONL; by default the Python standard
library's own source (real text on every machine). Streamed one file (or 1 MiB) at a time."""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

_CHUNK = 1 << 20


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running Python's standard library (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts and "dist-packages" not in f.parts)


def resolve(paths: list[str]) -> list[Path]:
    """Files named by ``paths`` (files, directories searched recursively, globs with ``**``), sorted."""
    if not paths:
        return stdlib_files()
    out: set[Path] = set()
    for p in paths:
        if os.path.isdir(p):
            out.update(f for f in Path(p).rglob("*") if f.is_file())
        elif os.path.isfile(p):
            out.add(Path(p))
        else:
            hits = [Path(h) for h in glob.glob(p, recursive=True) if os.path.isfile(h)]
            if not hits:
                raise ValueError(f"data.paths entry {p!r} matches no file")
            out.update(hits)
    return sorted(out)


def split(files: list[Path], val_percent: float) -> tuple[list[Path], list[Path]]:
    """(train, val): a file is in val when a hash of its name falls under ``val_percent``.
    Deterministic across machines and runs; at least one file on each side when there are two."""
    val = [f for f in files if zlib.crc32(f.name.encode() + str(f.parent.name).encode()) % 10000 < val_percent * 100]
    train = [f for f in files if f not in set(val)]
    if len(files) >= 2 and not val:
        val, train = train[-1:], train[:-1]
    if len(files) >= 2 and not train:
        train, val = val[:1], val[1:]
    if not train:
        train = val = list(files)
    return train, val


def documents(files: list[Path], jsonl_field: str = "text") -> Iterator[str]:
    """Texts of the files in order: each line's ``jsonl_field`` of ``.jsonl`` files, else the file
    in pieces of at most 1 MiB (a document may span several pieces)."""
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)[jsonl_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{f}:{n} is not a JSON object with a {jsonl_field!r} field (data.jsonl_field)") from None
        else:
            with open(f, encoding="utf-8", errors="replace") as fh:
                while piece := fh.read(_CHUNK):
                    yield piece
