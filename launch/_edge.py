"""The Hydra edge shared by the entry points in this directory (``train.py``, ``eval.py``, ...).

* Before Hydra starts: check every ``key=value`` override against the run's schema dataclass, so
  a typo (``model.n_layrs=2``) or an override the shell broke (``generate.prompt=def f(x):`` after
  it removed the quotes) stops with one line of ours, not Hydra's advice to add ``+``; refuse ``-m``
  inside a distributed launch (sweep outside; each sweep job launches its own ranks) and, under
  torchrun/Slurm/MPI, give every rank one ``hydra.run.dir``
  unless the user passed one: ``outputs/run-<launch id>`` (Slurm job id, torchrun ``--rdzv-id``) or,
  when the launch has no id of its own (one node: ``launch/run.sh``, ``torchrun --standalone``),
  ``outputs/run-<job>-<hash of the command>``: the same on every rank, across torchrun restarts and
  for a re-run of the same command, which therefore resumes.
* Ctrl-C / SIGTERM of a single run (:func:`interruptible`): one line per rank saying where the job
  stopped and the command that resumes it, exit code 130 (143 for SIGTERM).
* Resolvers used by ``conf/``: ``${ringrt.rank0:x}`` is x on global rank 0 and null elsewhere (so only
  rank 0 writes ``.hydra/`` and the log file), ``${ringrt.run_dir:}`` is the shared run directory.
* After composition: the config becomes a typed dataclass (``ringrt.run.schema.from_dict``) at once.
* Sweeps (``-m``): :class:`SweepResults` (a Hydra callback, ``conf/hydra/ringrt.yaml``) prints one line
  per job when the sweep ends: its overrides, its result (final step and loss) and its directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ringrt.distributed.launcher import command_id, detect, global_rank, program_argv, run_id
from ringrt.run.schema import ConfigError, from_dict, unknown_key

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


def check_overrides(argv: list[str], schema: type) -> None:
    """Exit with one line when an override names a key ``schema`` lacks or Hydra cannot parse it.

    Hydra would say ``Could not override 'model.n_layrs'. To append to your config use
    +model.n_layrs=2`` (the wrong fix) or ``mismatched input '('`` (the shell removed the quotes of
    ``generate.prompt="def f(x):"``). Config groups (``model=small``), ``hydra.*`` keys and ``+``/``~``
    overrides are left to Hydra and to the typed check after composition.
    """
    if any(a in ("--version", "-sc", "--shell-completion") for a in argv):
        return
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:  # Hydra's own parser will say what is wrong with the options
        return
    if args.config_name or args.config_path:  # another primary config: not necessarily this schema's
        return
    overrides = args.overrides
    parser = OverridesParser.create()
    groups = {p.name for p in (Path(LAUNCH_DIR).parent / "conf").iterdir() if p.is_dir()}
    for arg in overrides:
        try:
            o = parser.parse_override(arg)
        except HydraException as e:  # the grammar's errors (parse_overrides wraps them as OverrideParseException)
            hint = ""
            if "=" in arg:
                key, value = arg.split("=", 1)
                hydra_value = '"' + value.replace('"', '\\"') + '"'  # Hydra's quoted string: spaces, ( ) : , = kept
                quoted = shlex.quote(f"{key}={hydra_value}")
                hint = f"; if the shell removed its quotes, quote the whole override: {quoted}"
            msg = str(e).strip().splitlines()[0]
            sys.exit(f"config error: Hydra cannot parse the override {arg!r} ({msg}){hint}")
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None:
            continue
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or "/" in key or key in groups:
            continue
        problem = unknown_key(schema, key)
        if problem is not None:
            sys.exit(f"config error: {problem}")


def prepare(schema: type | None = None) -> None:
    """Check argv against the launch environment (and, given the run's ``schema`` dataclass, every
    override's key); make this directory importable by sweep jobs."""
    # Sweep jobs (submitit) unpickle the task function in a fresh interpreter that must import us.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if LAUNCH_DIR not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([LAUNCH_DIR, *[p for p in paths if p]])
    env = detect()
    argv = sys.argv[1:]
    if schema is not None:
        check_overrides(argv, schema)
    if env.world_size > 1 and any(a in ("-m", "--multirun") for a in argv):
        sys.exit(f"error: '-m' sweeps cannot run inside a {env.source} launch of {env.world_size} ranks; run the sweep "
                 f"outside (python launch/<job>.py -m hydra/launcher=submitit_slurm ...) and let each job start its ranks")


@contextlib.contextmanager
def user_errors(prog: str):
    """Around a single run's task body: a bad setting (a ValueError from ringrt's own validation)
    prints ``<prog>: error: <message>`` once per rank and exits 2, instead of Hydra's traceback.
    Sweep jobs re-raise (Hydra records the failed job and the sweep goes on); so does any other
    error, and every error with ``RINGRT_DEBUG=1``."""
    try:
        yield
    except ValueError as e:
        from ringrt.run.errors import is_user_error, user_error

        if any(a in ("-m", "--multirun") for a in sys.argv[1:]) or not is_user_error(e):
            raise
        finish(user_error(prog, e))


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


def quiet_deepspeed() -> None:
    """Before ``engine=deepspeed`` starts: DeepSpeed calls two ``torch.distributed`` functions torch 2.13
    deprecates (a FutureWarning per rank and message, from torch's ``c10d_logger.py``) and probes gcc
    for its ops through distutils' ``compilers`` logger at INFO (four lines per rank). Neither says
    anything a user can act on."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    logging.getLogger("compilers").setLevel(logging.WARNING)


def _summary(value) -> str:
    """A job's return value in one short line: its scalar entries (``step 200 | loss 3.412``)."""
    if not isinstance(value, dict):
        return "done" if value is None else repr(value)[:60]
    parts = []
    for k, v in value.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        elif isinstance(v, (bool, int)):
            parts.append(f"{k} {v}")
        elif isinstance(v, str):
            parts.append(f"{k} {v[:40]!r}")
    return " | ".join(parts) or "done"


class SweepResults(Callback):
    """A Hydra callback (``conf/hydra/ringrt.yaml``) that makes a sweep (``-m``) say how each job ended.

    Each job's global rank 0 writes ``<job dir>/.hydra/result.json`` (status, overrides, the scalar
    entries of what the job returned) wherever the job runs (a submitit process, a Slurm node);
    when the sweep ends the process that started it prints one line per job:
    ``sweep job 0 (train.lr=1e-3): step 200 | loss 3.412 -> multirun/2026-01-01/12-00-00/0``.
    Single runs are untouched.
    """

    def __init__(self) -> None:
        self._started = 0.0

    def on_multirun_start(self, config, **kwargs) -> None:
        self._started = time.time() - 1.0

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN or global_rank() != 0 or config.hydra.output_subdir is None:
            return
        from hydra.core.utils import JobStatus

        from ringrt.run.rundir import atomic_write_text

        ok = job_return.status == JobStatus.COMPLETED
        value = job_return._return_value
        result = {"status": "completed" if ok else "failed", "overrides": list(job_return.overrides or []),
                  "summary": _summary(value) if ok else f"FAILED: {type(value).__name__}: {value}".splitlines()[0]}
        out = Path(config.hydra.runtime.output_dir) / str(config.hydra.output_subdir) / "result.json"
        atomic_write_text(out, json.dumps(result))

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        found = []
        for f in sweep.glob(f"*/{config.hydra.output_subdir or '.hydra'}/result.json"):
            if f.stat().st_mtime < self._started:
                continue  # an earlier sweep's job in the same directory
            job = f.parent.parent
            try:
                found.append((job, json.loads(f.read_text())))
            except (OSError, ValueError):
                continue
        found.sort(key=lambda jr: (not jr[0].name.isdigit(), int(jr[0].name) if jr[0].name.isdigit() else 0, jr[0].name))
        shared = set.intersection(*(set(r.get("overrides", [])) for _, r in found)) if len(found) > 1 else set()
        for job, r in found:
            varying = " ".join(o for o in r.get("overrides", []) if o not in shared)  # what this job swept
            print(f"sweep job {job.name} ({varying or 'no overrides'}): {r.get('summary')} -> {job}", flush=True)


def started(env, out_dir: str) -> None:
    """One log line per rank (the log file is rank 0's; other ranks print it to the console only)."""
    import logging

    logging.getLogger("ringrt").info("rank %d/%d started by %s; run dir %s", env.rank, env.world_size, env.source,
                                     os.path.abspath(out_dir))


def write_resolved(run, out_dir: str) -> None:
    """Rank 0 writes the typed, resolved config as ``<out_dir>/run_config.yaml`` (atomically)."""
    if global_rank() != 0:
        return
    from ringrt.run.rundir import atomic_write_text
    from ringrt.run.schema import to_dict

    atomic_write_text(Path(out_dir) / "run_config.yaml", OmegaConf.to_yaml(OmegaConf.create(to_dict(run))))


def output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def end_job() -> None:
    """End of one job's work: tear down its process group (a sweep may run the next job here)."""
    from ringrt.distributed.launcher import shutdown

    shutdown()


def finish(code: int = 0) -> None:
    """Leave a single-run process: exit without interpreter teardown (where gloo threads can abort
    a process), so a finished rank never reports a crash. Not for sweep jobs (they return results)."""
    end_job()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
