"""The Hydra edge shared by the entry points in this directory (``train.py``, ``eval.py``, ...).

* Before Hydra starts: refuse ``-m`` inside a distributed launch (sweep outside; each sweep job
  launches its own ranks) and, under torchrun/Slurm/MPI, give every rank one ``hydra.run.dir``
  unless the user passed one: ``outputs/run-<launch id>`` (Slurm job id, torchrun ``--rdzv-id``) or,
  when the launch has no id of its own (one node: ``launch/run.sh``, ``torchrun --standalone``),
  ``outputs/run-<job>-<hash of the command>``: the same on every rank, across torchrun restarts and
  for a re-run of the same command, which therefore resumes.
* Ctrl-C / SIGTERM of a single run (:func:`interruptible`): one line per rank saying where the job
  stopped and the command that resumes it, exit code 130 (143 for SIGTERM).
* Resolvers used by ``conf/``: ``${ringrt.rank0:x}`` is x on global rank 0 and null elsewhere (so only
  rank 0 writes ``.hydra/`` and the log file), ``${ringrt.run_dir:}`` is the shared run directory.
* After composition: the config becomes a typed dataclass (``ringrt.schema.from_dict``) at once.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from ringrt.launcher import command_id, detect, global_rank, program_argv, run_id
from ringrt.schema import ConfigError, from_dict

LAUNCH_DIR = str(Path(__file__).resolve().parent)


def _run_dir() -> str:
    world = detect().world_size
    if world > 1:
        return f"outputs/run-{run_id() or command_id(world)}"
    return time.strftime("outputs/%Y-%m-%d/%H-%M-%S")


def _gives_run_dir(argv: list[str]) -> bool:
    return any(a.startswith(("hydra.run.dir=", "++hydra.run.dir=")) for a in argv)


def _register() -> None:
    if not OmegaConf.has_resolver("ringrt.rank0"):
        OmegaConf.register_new_resolver("ringrt.rank0", lambda x, other=None: x if global_rank() == 0 else other)
        OmegaConf.register_new_resolver("ringrt.run_dir", _run_dir, use_cache=True)


_register()  # also in sweep jobs, which import this module when they unpickle the task function


def prepare() -> None:
    """Check argv against the launch environment; make this directory importable by sweep jobs."""
    # Sweep jobs (submitit) unpickle the task function in a fresh interpreter that must import us.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if LAUNCH_DIR not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([LAUNCH_DIR, *[p for p in paths if p]])
    env = detect()
    argv = sys.argv[1:]
    if env.world_size > 1 and any(a in ("-m", "--multirun") for a in argv):
        sys.exit(f"error: '-m' sweeps cannot run inside a {env.source} launch of {env.world_size} ranks; run the sweep "
                 f"outside (python launch/<job>.py -m hydra/launcher=submitit_slurm ...) and let each job start its ranks")


def interruptible(job: str):
    """Around a single run's ``main()`` (not sweep jobs: submitit handles their signals): Ctrl-C or
    SIGTERM -> one line per rank saying where ``job`` stopped (and how to resume), exit 128 + signal."""
    from ringrt.jobs import interrupt

    if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        return contextlib.nullcontext()  # a sweep's launcher (submitit) cancels its jobs on Ctrl-C itself
    return interrupt.stops_cleanly(job)


def resumable_in(run_dir: str) -> None:
    """The command that resumes this run is this one with ``hydra.run.dir=<run_dir>`` (absolute),
    unless it already names a run dir."""
    from ringrt.jobs import interrupt

    interrupt.note(resume=[] if _gives_run_dir(program_argv()[1:]) else [f"hydra.run.dir={os.path.abspath(run_dir)}"])


def close_logger(logger) -> None:
    """Close the metrics logger (W&B finishes its run); after Ctrl-C without W&B's run summary on
    the console, where each rank's one line says what happened."""
    from ringrt.jobs import interrupt

    if interrupt.received() is None:
        logger.close()
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        logger.close()


def to_schema(cfg, schema: type):
    """Composed Hydra config -> ``schema`` dataclass; a bad key or value exits with its message."""
    data = OmegaConf.to_container(cfg, resolve=True)
    try:
        return from_dict(schema, data)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def started(env, out_dir: str) -> None:
    """One log line per rank (the log file is rank 0's; other ranks print it to the console only)."""
    import logging

    logging.getLogger("ringrt").info("rank %d/%d started by %s; run dir %s", env.rank, env.world_size, env.source,
                                     os.path.abspath(out_dir))


def write_resolved(run, out_dir: str) -> None:
    """Rank 0 writes the typed, resolved config as ``<out_dir>/run_config.yaml`` (atomically)."""
    if global_rank() != 0:
        return
    from ringrt.rundir import atomic_write_text
    from ringrt.schema import to_dict

    atomic_write_text(Path(out_dir) / "run_config.yaml", OmegaConf.to_yaml(OmegaConf.create(to_dict(run))))


def output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def end_job() -> None:
    """End of one job's work: tear down its process group (a sweep may run the next job here)."""
    from ringrt.launcher import shutdown

    shutdown()


def finish(code: int = 0) -> None:
    """Leave a single-run process: exit without interpreter teardown (where gloo threads can abort
    a process), so a finished rank never reports a crash. Not for sweep jobs (they return results)."""
    end_job()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
