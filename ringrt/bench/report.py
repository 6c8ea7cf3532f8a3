"""Writing benchmark results: JSON atomically, and a PNG line plot when matplotlib is installed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..run.rundir import as_if_opened


def write_json(path: str | os.PathLike, data) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        as_if_opened(tmp)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def maybe_plot(json_path, rows: list[dict], *, x: str, ys: list[str], group: str | None, title: str, ylabel: str) -> str | None:
    """A PNG next to ``json_path`` with one line per (group value, y); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = sorted({r[group] for r in rows}) if group else [None]
    for gv in groups:
        sel = [r for r in rows if group is None or r[group] == gv]
        for y in ys:
            ax.plot([r[x] for r in sel], [r[y] for r in sel], marker="o", label=f"{gv} {y}" if gv is not None else y)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    png = str(Path(json_path).with_suffix(".png"))
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, png)
    return png
