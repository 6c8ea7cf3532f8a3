"""Run plumbing around the jobs: configs, checkpoints, run directories, metrics.

``config.py`` the run configs Hydra composes (one dataclass per job), ``schema.py`` dicts -> typed
dataclasses, ``checkpoint.py`` / ``checkpoint_trust.py`` resumable checkpoints and what may be
loaded, ``rundir.py`` atomic writes and shared run directories, ``metrics.py`` / ``telemetry.py``
log lines, W&B, throughput.

May import: ``ringrt.ops``, ``ringrt.distributed`` and the config dataclasses of the packages above.
"""
