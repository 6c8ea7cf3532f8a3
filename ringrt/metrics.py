"""A small metrics logger: ``log(step, **metrics)`` to pluggable sinks, on rank 0 only.

Sinks are callables ``sink(step: int, metrics: dict) -> None`` with an optional ``close()``;
``ConsoleSink`` prints one line, ``JsonlSink`` appends one JSON object per call.

Values may be 0-dim tensors on the job's device (``grad_norm``): the logger reads them back only
when it has sinks (rank 0), so the other ranks never wait for a number nobody prints.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Protocol


class Sink(Protocol):
    def __call__(self, step: int, metrics: dict) -> None: ...


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 or not math.isfinite(v) else f"{v:.3e}"
    return str(v)


class ConsoleSink:
    def __init__(self, stream=None, write: Callable[[str], None] | None = None):
        self._write = write or (lambda s: print(s, file=stream or sys.stdout, flush=True))

    def __call__(self, step, metrics):
        self._write(f"step {step:>6d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))


class JsonlSink:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def __call__(self, step, metrics):
        self._f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()


def _number(v):
    """A 0-dim tensor (any device) or numpy scalar as a Python number; anything else as it is."""
    return v.item() if getattr(v, "ndim", None) == 0 and hasattr(v, "item") else v


class MetricsLogger:
    """Fans ``log(step, **metrics)`` out to ``sinks``; does nothing unless ``enabled`` (rank 0)."""

    def __init__(self, sinks: list[Sink] | None = None, *, enabled: bool = True):
        self.sinks = list(sinks or []) if enabled else []
        self.enabled = enabled

    def add(self, sink: Sink) -> None:
        if self.enabled:
            self.sinks.append(sink)

    def log(self, step: int, **metrics) -> None:
        if not self.sinks:
            return
        metrics = {k: _number(v) for k, v in metrics.items()}
        for s in self.sinks:
            s(step, metrics)

    def close(self) -> None:
        for s in self.sinks:
            getattr(s, "close", lambda: None)()


class WandbSink:
    """Weights & Biases run (``mode``: ``offline`` default, ``online``, ``disabled``); rank 0 only.

    Offline runs land in ``<dir>/wandb/offline-run-*``; ``wandb sync <that dir>`` uploads them later.
    Keys are logged as given (``loss``, ``tokens_per_s``, ``flops_per_s``, ``peak_mem_bytes``,
    ``comm_bytes``, ...) with ``step`` as the x-axis.
    """

    def __init__(self, *, mode: str = "offline", project: str = "ringrt", dir: str = ".", entity: str | None = None,
                 name: str | None = None, group: str | None = None, tags: list[str] | None = None,
                 config: dict | None = None):
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb={mode!r} is not valid; valid: 'offline', 'online', 'disabled'")
        import wandb  # optional: pip install wandb

        os.makedirs(dir, exist_ok=True)
        self._run = wandb.init(mode=mode, project=project, entity=entity, name=name, group=group, tags=tags,
                               dir=dir, config=config, reinit="finish_previous")

    @property
    def run(self):
        return self._run

    def __call__(self, step, metrics):
        self._run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self):
        self._run.finish()
