"""The learning-rate schedule every trainer follows: linear warm-up, then cosine decay.

The plain trainer (``ringrt/jobs/train.py``), the embedder trainer (``ringrt/compression/train.py``)
and the DeepSpeed engine (``ringrt/engines/deepspeed.py``) set each step's rate from here, so the
same ``train`` settings give the same curve whichever of them runs::

    lr |    /""--.._
       |   /        `-._
       |  /             `--.._______ min_lr
       +--+--------------------+------> step
       0  warmup_steps         steps
"""

from __future__ import annotations

import math
from typing import Protocol


class Schedule(Protocol):
    """The fields of :class:`ringrt.jobs.config.TrainConfig` the schedule reads."""

    lr: float
    min_lr: float
    warmup_steps: int
    steps: int


def lr_at(step: int, t: Schedule) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``.

    ``step`` counts optimizer steps from 0 (the rate of the step about to run).
    """
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * frac))
