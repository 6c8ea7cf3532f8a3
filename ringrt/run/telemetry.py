"""Per-step system metrics added to what a job logs: achieved FLOP/s, peak memory, bytes communicated.

``Telemetry(sinks, flops_per_token=...)`` is itself a sink: for every logged step that carries
``tokens_per_s`` it adds

* ``flops_per_s``: tokens_per_s x flops_per_token (see :func:`train_flops_per_token`);
* ``peak_mem_bytes``: CUDA peak allocated memory on GPU, else the process's peak RSS;
* ``comm_bytes``: bytes this rank sent through ``ringrt.distributed.comm`` since the previous logged step,

then forwards to ``sinks``.
"""

from __future__ import annotations

import resource
import sys

import torch

from ..distributed import comm


def train_flops_per_token(*, n_params: int, n_layers: int, dim: int, seq_len: int, causal: bool = True) -> float:
    """Forward + backward FLOPs per token: 6·N for the weights plus 12·L·d·T for attention scores
    (halved under a causal mask), as in the PaLM/Megatron MFU accounting."""
    attn = 12 * n_layers * dim * seq_len * (0.5 if causal else 1.0)
    return 6.0 * n_params + attn


def peak_memory_bytes() -> int:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _bytes_sent() -> int:
    return sum(s.bytes_sent for s in comm.stats().values())


class Telemetry:
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


def metrics_logger(logging_cfg, out_dir: str, *, config: dict | None = None, flops_per_token: float = 0.0):
    """The run's :class:`ringrt.run.metrics.MetricsLogger` from a :class:`ringrt.run.config.LoggingConfig`:
    console line, ``<out_dir>/metrics.jsonl`` and W&B, on global rank 0 only, behind :class:`Telemetry`."""
    import os

    from ..distributed.launcher import global_rank
    from .metrics import ConsoleSink, JsonlSink, MetricsLogger, WandbSink

    if global_rank() != 0:
        return MetricsLogger([], enabled=False)
    sinks = []
    if logging_cfg.console:
        sinks.append(ConsoleSink())
    if logging_cfg.jsonl:
        sinks.append(JsonlSink(os.path.join(out_dir, "metrics.jsonl")))
    if logging_cfg.wandb != "disabled":
        sinks.append(WandbSink(mode=logging_cfg.wandb, project=logging_cfg.project, dir=out_dir,
                               entity=logging_cfg.entity, name=logging_cfg.name or os.path.basename(os.path.abspath(out_dir)),
                               group=logging_cfg.group, tags=list(logging_cfg.tags), config=config))
    return MetricsLogger([Telemetry(sinks, flops_per_token=flops_per_token)])
