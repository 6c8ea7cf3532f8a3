"""Top-level configs of the entry points in ``launch/``: a job's own config plus logging and launcher.

The Hydra config tree ``conf/`` mirrors these dataclasses key for key; ``launch/`` turns the composed
config into one of them with :func:`ringrt.schema.from_dict` (unknown keys and wrong types are
rejected there) and everything below sees plain dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .compression.config import CompressionConfig
from .data.config import DataConfig
from .engines.deepspeed import DeepSpeedConfig
from .jobs.config import EvalConfig, EvalJobConfig, GenerateConfig, GenerateJobConfig, TrainConfig, TrainJobConfig
from .launcher import LaunchConfig
from .model.config import AttentionConfig, ModelConfig
from .probe import ProbeConfig


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


@dataclass(kw_only=True, slots=True)
class TrainRun:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    engine: Literal["torch", "deepspeed"] = "torch"
    """Who owns parameters and optimizer: ``torch`` (AdamW, DCP checkpoints) or ``deepspeed`` (ZeRO)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LaunchConfig = field(default_factory=LaunchConfig)

    def job(self) -> TrainJobConfig:
        return TrainJobConfig(model=self.model, attention=self.attention, data=self.data, train=self.train,
                              compression=self.compression)


@dataclass(kw_only=True, slots=True)
class EvalRun:
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    launcher: LaunchConfig = field(default_factory=LaunchConfig)

    def job(self) -> EvalJobConfig:
        return EvalJobConfig(attention=self.attention, data=self.data, eval=self.eval, compression=self.compression)


@dataclass(kw_only=True, slots=True)
class GenerateRun:
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    launcher: LaunchConfig = field(default_factory=LaunchConfig)

    def job(self) -> GenerateJobConfig:
        return GenerateJobConfig(attention=self.attention, data=self.data, generate=self.generate)


@dataclass(kw_only=True, slots=True)
class ProbeRun:
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    launcher: LaunchConfig = field(default_factory=LaunchConfig)
