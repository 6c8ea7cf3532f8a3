"""Run plumbing around the jobs: run directories, checkpoints, metrics, the learning-rate schedule, configs.

Read first: ``rundir.py`` (atomic writes into the shared run directory; a training run's model),
``checkpoint.py`` with ``checkpoint_trust.py`` (resumable checkpoints and which ones may be loaded),
``metrics.py`` (log lines, JSONL, W&B, throughput, FLOP/s, memory and bytes sent). Then
``lr_schedule.py`` (warm-up + cosine, shared by every trainer), ``schema.py`` (dicts and flags ->
typed dataclasses) and ``config.py`` (the run configs Hydra composes, one dataclass per entry point).

May import: ``ringrt.distributed`` and ``ringrt.ops`` only: not the attention (schedules, Λ-mask,
api) nor anything above it (model, data, compression, jobs, engines, tools). The one
exception is ``config.py``, which composes every package's config: it sits on top of everything and
nothing in ringrt imports it (only ``launch/`` and the tests). Enforced by ``tests/test_architecture.py``.
"""
