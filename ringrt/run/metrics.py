"""Metrics of a run: ``log(step, **metrics)`` to pluggable sinks, on rank 0 only.

Sinks are callables ``sink(step: int, metrics: dict) -> None`` with an optional ``close()``;
``ConsoleSink`` prints one line, ``JsonlSink`` appends one JSON object per call, ``WandbSink``
logs to Weights & Biases. :func:`metrics_logger` builds a run's logger from its ``logging`` settings.

Lines for the person watching go through :func:`say`: above the progress bar while one is shown
(:func:`progress_bar`), and into the run's log file when the logging setup has one (Hydra's
``<job>.log``), so the log holds the step lines too. :class:`Throughput` turns step times into
the ``tokens_per_s`` column; :class:`Telemetry` adds the system columns to each logged step that
has one (``flops_per_s``, ``peak_mem_bytes``, ``comm_bytes``).

Values may be 0-dim tensors on the job's device (``grad_norm``): the logger reads them back only
when it has sinks (rank 0), so the other ranks never wait for a number nobody prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Protocol

import torch

from ..distributed import comm

_bar = None
"""The progress bar on screen (set by :func:`progress_bar`), or None."""



@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """Where metrics go (written by global rank 0 only)."""

    wandb: Literal["offline", "online", "disabled"] = "offline"
    """``offline``: a local run under ``<out_dir>/wandb`` (upload later with ``wandb sync``);
    ``online``: stream to the W&B server (needs ``WANDB_API_KEY`` or ``wandb login``); ``disabled``: none."""
    project: str = "ringrt"
    entity: str | None = None
    name: str | None = None
    """Run name; None = the output directory's name."""
    group: str | None = None
    """Groups the runs of one sweep in the W&B UI."""
    tags: list[str] = field(default_factory=list)
    jsonl: bool = True
    """Append every logged step to ``<out_dir>/metrics.jsonl``."""
    console: bool = True
    """Print one ``step N | key value | ...`` line per logged step."""

def _log_files() -> list[logging.FileHandler]:
    """The root logger's file handlers (Hydra's ``<job>.log``), not counting ones that write to /dev/null."""
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and os.path.abspath(h.baseFilename) != os.devnull]


def say(line: str) -> None:
    """Print ``line`` on stdout for the person watching (above the progress bar when one is shown)
    and append it to the run's log files."""
    if _bar is not None:
        _bar.write(line, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(line, flush=True)
    files = _log_files()
    if files:
        record = logging.LogRecord("ringrt", logging.INFO, __file__, 0, line, None, None)
        for h in files:
            if record.levelno >= h.level:
                h.handle(record)


@contextlib.contextmanager
def progress_bar(*, total: int, initial: int, desc: str, show: bool) -> Iterator:
    """A tqdm bar on stderr (None unless ``show`` and stderr is a terminal); while it is shown,
    :func:`say` and the console's log handlers write above it instead of through it."""
    global _bar
    if not (show and sys.stderr.isatty()):
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=total, initial=initial, desc=desc, unit="step")
    _bar = bar
    try:
        with logging_redirect_tqdm():
            yield bar
    finally:
        _bar = None
        bar.close()


class Sink(Protocol):
    def __call__(self, step: int, metrics: dict) -> None: ...


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 or not math.isfinite(v) else f"{v:.3e}"
    return str(v)


class Throughput:
    """Tokens per second over the steps since the last logged line, timing only the steps (not
    checkpoint saves or logging), and leaving out the first step after start or resume, whose time
    includes start-up (first calls, allocations, the first ring exchanges) — unless it is the only
    step measured so far."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._steps, self._seconds = 0, 0.0  # since the last line
        self._all_steps, self._all_seconds = 0, 0.0  # the whole run, but its first step
        self._first: float | None = None

    def add(self, seconds: float) -> None:
        if self._first is None:
            self._first = seconds
            return
        self._steps += 1
        self._seconds += seconds
        self._all_steps += 1
        self._all_seconds += seconds

    def take(self) -> float:
        """Tokens/s of the window since the previous call, which starts a new window."""
        if self._steps == 0:  # only the first step so far
            return self.tokens_per_step / self._first if self._first else 0.0
        tps = self._steps * self.tokens_per_step / self._seconds
        self._steps, self._seconds = 0, 0.0
        return tps

    def run_mean(self) -> float:
        """Tokens/s over the whole run but its first step (0.0 when no step ran)."""
        if self._all_steps == 0:
            return self.tokens_per_step / self._first if self._first else 0.0
        return self._all_steps * self.tokens_per_step / self._all_seconds


class ConsoleSink:
    """``step N | key value | ...``: through :func:`say` (above the progress bar, and into the log
    file), or to ``stream`` / ``write`` when given."""

    def __init__(self, stream=None, write: Callable[[str], None] | None = None):
        self._write = write or ((lambda s: print(s, file=stream, flush=True)) if stream is not None else say)

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
        # Offline: no banner and ~20-line run summary on the console; close() says in one line where the run is.
        settings = wandb.Settings(silent=True) if mode == "offline" else None
        self._run = wandb.init(mode=mode, project=project, entity=entity, name=name, group=group, tags=tags,
                               dir=dir, config=config, reinit="finish_previous", settings=settings)
        self._offline_dir = self._run.settings.sync_dir if mode == "offline" else None

    @property
    def run(self):
        return self._run

    def __call__(self, step, metrics):
        self._run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self):
        self._run.finish()
        if self._offline_dir:
            print(f"wandb: offline run in {self._offline_dir} (upload later: wandb sync {self._offline_dir})", flush=True)


# --- Telemetry: the system columns -------------------------------------------------------------


def train_flops_per_token(*, n_params: int, n_layers: int, dim: int, seq_len: int, causal: bool = True) -> float:
    """Forward + backward FLOPs per token: 6·N for the weights plus 12·L·d·T for attention scores
    (halved under a causal mask), as in the PaLM/Megatron MFU accounting."""
    attn = 12 * n_layers * dim * seq_len * (0.5 if causal else 1.0)
    return 6.0 * n_params + attn


def peak_memory_bytes() -> int:
    """CUDA peak allocated memory on a GPU process, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _bytes_sent() -> int:
    return sum(s.bytes_sent for s in comm.stats().values())


class Telemetry:
    """A sink in front of ``sinks``: for every logged step that carries ``tokens_per_s`` it adds

    * ``flops_per_s``: tokens_per_s x ``flops_per_token`` (see :func:`train_flops_per_token`);
    * ``peak_mem_bytes``: :func:`peak_memory_bytes`;
    * ``comm_bytes``: bytes this rank sent through ``ringrt.distributed.comm`` since the previous logged step,

    then forwards the step to ``sinks``.
    """

    def __init__(self, sinks, *, flops_per_token: float):
        self.sinks = list(sinks)
        self.flops_per_token = float(flops_per_token)
        self._sent = _bytes_sent()

    def __call__(self, step: int, metrics: dict) -> None:
        if "tokens_per_s" in metrics:
            sent = _bytes_sent()
            metrics = {**metrics, "flops_per_s": metrics["tokens_per_s"] * self.flops_per_token,
                       "peak_mem_bytes": peak_memory_bytes(), "comm_bytes": sent - self._sent}
            self._sent = sent
        for s in self.sinks:
            s(step, metrics)

    def close(self) -> None:
        for s in self.sinks:
            getattr(s, "close", lambda: None)()


def metrics_logger(logging_cfg, out_dir: str, *, config: dict | None = None, flops_per_token: float = 0.0) -> MetricsLogger:
    """The run's :class:`MetricsLogger` from a :class:`LoggingConfig`: console line,
    ``<out_dir>/metrics.jsonl`` and W&B, on global rank 0 only, behind :class:`Telemetry`."""
    from ..distributed.launcher import global_rank

    if global_rank() != 0:
        return MetricsLogger([], enabled=False)
    sinks: list[Sink] = []
    if logging_cfg.console:
        sinks.append(ConsoleSink())
    if logging_cfg.jsonl:
        sinks.append(JsonlSink(os.path.join(out_dir, "metrics.jsonl")))
    if logging_cfg.wandb != "disabled":
        sinks.append(WandbSink(mode=logging_cfg.wandb, project=logging_cfg.project, dir=out_dir,
                               entity=logging_cfg.entity, name=logging_cfg.name or os.path.basename(os.path.abspath(out_dir)),
                               group=logging_cfg.group, tags=list(logging_cfg.tags), config=config))
    return MetricsLogger([Telemetry(sinks, flops_per_token=flops_per_token)])
