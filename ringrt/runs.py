"""Top-level configs of the entry points in ``launch/``: a job's own config plus logging and launcher.

This module sits on top of every package (it gathers their configs); nothing in ``ringrt`` imports it.

The Hydra config tree ``conf/`` mirrors these dataclasses key for key; ``launch/`` turns the composed
config into one of them with :func:`ringrt.run.schema.from_dict` (unknown keys and wrong types are
rejected there) and everything below sees plain dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from .distributed.launcher import LaunchConfig
from .engines.deepspeed import DeepSpeedConfig
from .jobs.config import EvalJobConfig, GenerateJobConfig, TrainJobConfig
from .jobs.probe import ProbeConfig
from .run.metrics import LoggingConfig


def _job_of(run, job_cls):
    """The job config inside a run config: the fields the two share (a run extends its job)."""
    return job_cls(**{f.name: getattr(run, f.name) for f in fields(job_cls)})


@dataclass(kw_only=True, slots=True)
class TrainRun(TrainJobConfig):
    """The train job's config plus the engine, logging and launcher settings of ``launch/train.py``."""

    engine: Literal["torch", "deepspeed"] = "torch"
    """Who owns parameters and optimizer: ``torch`` (AdamW, DCP checkpoints) or ``deepspeed`` (ZeRO)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LaunchConfig = field(default_factory=LaunchConfig)

    def job(self) -> TrainJobConfig:
        return _job_of(self, TrainJobConfig)


@dataclass(kw_only=True, slots=True)
class EvalRun(EvalJobConfig):
    launcher: LaunchConfig = field(default_factory=LaunchConfig)

    def job(self) -> EvalJobConfig:
        return _job_of(self, EvalJobConfig)


@dataclass(kw_only=True, slots=True)
class GenerateRun(GenerateJobConfig):
    launcher: LaunchConfig = field(default_factory=LaunchConfig)

    def job(self) -> GenerateJobConfig:
        return _job_of(self, GenerateJobConfig)


@dataclass(kw_only=True, slots=True)
class ProbeRun:
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    launcher: LaunchConfig = field(default_factory=LaunchConfig)
