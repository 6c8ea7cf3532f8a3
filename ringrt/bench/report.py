"""Writing benchmark results: JSON atomically, and a PNG line plot when matplotlib is installed."""

from __future__ import annotations

import os
from pathlib import Path

from ..run.rundir import atomic_save_figure, atomic_write_json


def write_json(path: str | os.PathLike, data) -> None:
    """Write ``data`` as JSON to ``path`` atomically, keys in the order measured."""
    atomic_write_json(path, data, sort_keys=False)


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
    png = atomic_save_figure(fig, Path(json_path).with_suffix(".png"), bbox_inches="tight")
    plt.close(fig)
    return png
