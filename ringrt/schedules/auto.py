"""``algorithm="auto"``: pick the schedule per problem, from the cost model and, when the model
cannot tell the best candidates apart, from a measurement.

The problem (batch, global sequence, heads, kv_heads, head_dim, dtype, causal, whether gradients
will be needed, layout, world size, ranks per node) goes to :func:`ringrt.schedules.costmodel.rank_schedules`
on this process's machine description: the calibration file of ``ringrt simulate calibrate``
(``RINGRT_CALIBRATION`` or ``~/.cache/ringrt/calibration.json``) on CPU, else the defaults; on CUDA
the ``RINGRT_MACHINE`` preset when set, else the preset of the GPU's name (:func:`gpu_preset`; an
unknown GPU is priced as ``h100`` with one warning). GPU presets are simulation, not measurements of
this machine, so on them the shortlist is wider (``TUNE_MARGIN_SIMULATED``) and measurement decides.

Tuning (as cuDNN's benchmark mode does): the candidates whose estimate is within ``TUNE_MARGIN`` of
the best (at most ``TUNE_MAX``) form a shortlist; with more than one, the first call of the problem
runs each of them ``TUNE_ROUNDS`` times round-robin on copies of the inputs (forward, plus backward
when gradients are needed), every rank times them (device work included: ``ringrt.ops.timing``
synchronises CUDA before and after each run), one all_reduce takes the slowest rank's times,
and the fastest best round wins on every rank alike. The traffic this costs is counted on the
``auto`` channel. ``RINGRT_AUTO_TUNE=0`` turns tuning off (the model's first choice runs); after
``TUNE_LIMIT`` tuned problems in a process, new problems use the model's choice (one warning).

Packed documents (``cu_seqlens``) are one problem per power of 2 of the padded length and per power of
2 of the work fraction their blocks leave (``costmodel.Problem.work_fraction``): each batch pads its
documents differently, and deciding (or tuning) again for each would cost more than it saves.

Every rank must run the same schedule, yet calibration files could differ between nodes, so without
tuning the first call with a new problem broadcasts rank 0's choice (one small collective). Later
calls with the same problem reuse the choice without communication (the backward finds the forward's
choice there too). The choice, every estimate and any measured times go to
``logging.getLogger("ringrt.auto")`` at DEBUG.

The chosen schedule's kept tensors travel from forward to backward packed into one byte buffer:
their number and shapes depend on the choice, which a trace cannot know, so its size is a run-time
size for ``torch.compile`` (captured with ``fullgraph=True``; without it, dynamo runs the call
outside the graph unless ``torch._dynamo.config.capture_dynamic_output_shape_ops`` is set).

The candidates are the schedules of ``registry.SCHEDULES``. This module reads the settings
(``RINGRT_CALIBRATION``, ``RINGRT_MACHINE``, ``RINGRT_AUTO_TUNE``, and the hybrid's
``RINGRT_ULYSSES_DEGREE`` through :func:`hybrid.degree_setting`) and hands their values to the cost
model, which reads none itself.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..distributed import comm
from ..distributed.comm import count, nbytes, pack, unpack
from ..ops import timing as devtime
from . import costmodel
from .base import Pass, RingPlan, Spec
from .hybrid import degree_setting
from .registry import SCHEDULES

log = logging.getLogger("ringrt.auto")

TUNE_MARGIN = 0.5
TUNE_MARGIN_SIMULATED = 2.0
TUNE_MAX = 3
TUNE_ROUNDS = 3
TUNE_LIMIT = 64
_CHOICES: dict[tuple, tuple[str, list, dict]] = {}
_MACHINES: dict[str, costmodel.Machine] = {}


# Substrings of ``torch.cuda.get_device_name()`` -> cost-model preset, most specific first.
_GPU_PRESETS = (("H800", "h800"), ("H100", "h100"), ("H200", "h100"), ("GH200", "h100"), ("A100", "a100"),
                ("A800", "a100"), ("A10", "a10"))


def gpu_preset(device_name: str) -> str | None:
    """The ``costmodel.PRESETS`` key for a GPU called ``device_name`` (e.g. "NVIDIA H100 80GB HBM3"),
    or None when no preset describes it."""
    name = device_name.upper()
    for needle, preset in _GPU_PRESETS:
        if needle in name and not (needle == "A10" and "A100" in name):
            return preset
    return None


def calibration_path() -> Path:
    """``RINGRT_CALIBRATION`` or ``~/.cache/ringrt/calibration.json``."""
    env = os.environ.get("RINGRT_CALIBRATION")
    return Path(env) if env else Path.home() / ".cache" / "ringrt" / "calibration.json"


def load_machine(path: str | Path | None = None) -> costmodel.Machine:
    """The calibrated CPU machine from ``path`` (default :func:`calibration_path`), else the defaults."""
    p = Path(path) if path else calibration_path()
    if p.exists():
        return costmodel.machine_from_dict(json.loads(p.read_text())["machine"])
    return costmodel.PRESETS["cpu"]


def machine_for(device: torch.device) -> costmodel.Machine:
    """The machine description ``auto`` prices schedules on for tensors on ``device``."""
    key = str(device) if device.type == "cuda" else device.type
    if key not in _MACHINES:
        if device.type == "cuda":
            preset = os.environ.get("RINGRT_MACHINE")
            if preset is not None and preset not in costmodel.PRESETS:
                raise ValueError(f"RINGRT_MACHINE={preset!r} is not a known preset; valid: {', '.join(sorted(costmodel.PRESETS))}")
            if preset is None:
                gpu = torch.cuda.get_device_name(device)
                preset = gpu_preset(gpu)
                if preset is None:
                    preset = "h100"
                    log.warning("auto: no cost-model preset describes %r; pricing it as %s (set RINGRT_MACHINE "
                                "to one of %s) and measuring a wider shortlist", gpu, preset, ", ".join(sorted(costmodel.PRESETS)))
            _MACHINES[key] = costmodel.PRESETS[preset]
        else:
            _MACHINES[key] = load_machine()
    return _MACHINES[key]


def problem_of(q: torch.Tensor, k: torch.Tensor, plan: RingPlan, world: int, backward: bool) -> costmodel.Problem:
    """The cost-model problem of shards q (B, S_l, H, D), k (B, S_l, H_kv, D)."""
    return costmodel.Problem(
        batch=q.shape[0], seq=q.shape[1] * world, heads=q.shape[2], kv_heads=k.shape[2], head_dim=q.shape[3],
        dtype_bytes=q.element_size(), causal=plan.causal, backward=backward, layout=plan.layout,
        work_fraction=_work_fraction(plan),
    )


def _work_fraction(plan: RingPlan) -> float:
    """The cost model's ``work_fraction`` of packed documents, rounded to a power of 2: batches of
    similar documents then share one problem (one choice, one tuning), not one each."""
    docs = plan.documents
    if docs is None:
        return 1.0
    return 2.0 ** round(math.log2(sum(c * c for c in docs.slots) / docs.chunk**2))


def choose(p: costmodel.Problem, m: costmodel.Machine, world: int, topology: str = "full",
           ulysses_degree: int | None = None) -> tuple[str, list[costmodel.Estimate]]:
    """(chosen schedule, every candidate's estimate fastest first). Pure; no communication.
    ``ulysses_degree``: the hybrid's set degree (``RINGRT_ULYSSES_DEGREE``), None: the model's rule."""
    ests = costmodel.rank_schedules(p, m, world, ulysses_degree=ulysses_degree)
    if topology == "ring":  # no direct links: schedules that need them are priced but not picked
        ests = [e for e in ests if e.schedule not in ("ulysses", "hybrid", "allgather")] or ests
    return ests[0].schedule, ests


class _Last:
    choice: tuple[str, dict] | None = None


def last_choice() -> tuple[str, dict] | None:
    """(schedule, measured best-round seconds if it was tuned) of this process's latest auto call."""
    return _Last.choice


def shortlist(ests: list[costmodel.Estimate], margin: float = TUNE_MARGIN) -> list[str]:
    """Candidates worth measuring: estimates within ``margin`` of the best, at most ``TUNE_MAX``."""
    best = ests[0].total
    return [e.schedule for e in ests if e.total <= (1.0 + margin) * best][:TUNE_MAX]


def _tuning_enabled() -> bool:
    return os.environ.get("RINGRT_AUTO_TUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _tune(names: list[str], q, k, v, plan, backward: bool) -> dict[str, float]:
    """Best-round seconds of each schedule in ``names`` on copies of the inputs, the slowest rank's
    (identical on every rank)."""
    g = plan.groups
    rounds: dict[str, list[float]] = {n: [] for n in names}

    def run(n: str, qq, kk, vv) -> None:
        out, lse, kept = SCHEDULES[n].forward(qq, kk, vv, plan)
        if backward:
            SCHEDULES[n].backward(torch.ones_like(out), qq, kk, vv, out, lse, kept, plan)

    for i in range(TUNE_ROUNDS):
        for n in names:
            copies = [x.detach().clone() for x in (q, k, v)]
            comm.collective("barrier", lambda: dist.barrier(group=g.base, async_op=True), group=g.base, device=q.device,
                            timeout_s=plan.timeout, channel="auto", step=f"tuning round {i}, before {n}")
            rounds[n].append(devtime.elapsed(functools.partial(run, n, *copies), q.device))
    best = torch.tensor([min(rounds[n]) for n in names], dtype=torch.float64,
                        device=comm.metadata_device(g.base, q.device))
    comm.collective("all_reduce", lambda: dist.all_reduce(best, op=dist.ReduceOp.MAX, group=g.base, async_op=True),
                    group=g.base, device=best.device, timeout_s=plan.timeout, channel="auto", step="tuning result")
    return dict(zip(names, best.cpu().tolist(), strict=True))


class _Tuning:
    tuned = 0
    warned = False


def _agree(name: str, short: list[str], tune: bool, q, g, timeout: float | None = None) -> tuple[str, list[str], bool]:
    """Rank 0's (choice, shortlist, whether to tune), on every rank: one broadcast of 2 + TUNE_MAX
    integers, so ranks whose calibration files or settings differ still take the same path."""
    names = list(SCHEDULES)
    vec = torch.full((2 + TUNE_MAX,), -1, dtype=torch.int64)
    vec[0], vec[1] = names.index(name), int(tune)
    vec[2 : 2 + len(short)] = torch.tensor([names.index(n) for n in short], dtype=torch.int64)
    vec = vec.to(comm.metadata_device(g.base, q.device))
    comm.collective("broadcast from rank 0", lambda: dist.broadcast(vec, group_src=0, group=g.base, async_op=True),
                    group=g.base, device=vec.device, timeout_s=timeout, channel="auto", step="choice")
    n = vec.numel() * vec.element_size()
    if g.rank == 0:
        count("auto", sent=(g.world - 1) * n, recv=0, sends=g.world - 1, recvs=0)
    else:
        count("auto", sent=0, recv=n, sends=0, recvs=1)
    got = vec.cpu().tolist()
    return names[got[0]], [names[i] for i in got[2:] if i >= 0], bool(got[1])


def _decide(q, k, v, plan: RingPlan, p: costmodel.Problem, m: costmodel.Machine) -> tuple[str, list, dict]:
    """(schedule, estimates fastest first, measured best-round seconds if tuned)."""
    g = plan.groups
    name, ests = choose(p, m, g.world, plan.topology, ulysses_degree=degree_setting(g.world))
    if g.world == 1:
        return name, ests, {}
    short = shortlist(ests, TUNE_MARGIN_SIMULATED if m.simulated else TUNE_MARGIN)
    tune = len(short) > 1 and _tuning_enabled()
    if tune and _Tuning.tuned >= TUNE_LIMIT:
        tune = False
        if not _Tuning.warned:
            _Tuning.warned = True
            log.warning("auto: %d problems tuned in this process; new problems use the cost model's choice", TUNE_LIMIT)
    name, short, tune = _agree(name, short, tune, q, g, plan.timeout)
    if not tune:
        return name, ests, {}
    _Tuning.tuned += 1
    before = comm.stats()
    measured = _tune(short, q, k, v, plan, p.backward)
    comm.move_since(before, "auto")
    return min(measured, key=measured.get), ests, measured


def _choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> str:
    """The schedule for this problem: decided on its first call (see the module note), then reused."""
    g = plan.groups
    p = problem_of(q, k, plan, g.world, plan.backward)
    m = machine_for(q.device)
    # packed documents: the shard's length moves with every batch's padding; one choice per power of 2 of it
    seq = p.seq if plan.documents is None else 1 << (p.seq - 1).bit_length()
    key = (g.rank, g.world, id(g.base), q.device.type, plan.topology, seq,
           *(getattr(p, f) for f in ("batch", "heads", "kv_heads", "head_dim", "dtype_bytes", "causal", "backward", "layout",
                                     "work_fraction")))
    if key not in _CHOICES:
        _CHOICES[key] = _decide(q, k, v, plan, p, m)
    name, ests, measured = _CHOICES[key]
    _Last.choice = (name, measured)
    if log.isEnabledFor(logging.DEBUG):
        shown = ", ".join(f"{e.schedule}={e.total * 1e3:.3f}ms" for e in ests)
        timed = "; measured (best of %d): %s" % (TUNE_ROUNDS, ", ".join(f"{n}={t * 1e3:.3f}ms" for n, t in measured.items())) if measured else ""
        log.debug(
            "auto: %s for B=%d S=%d H=%d H_kv=%d D=%d %s causal=%s %s W=%d layout=%s on %s; estimates: %s%s",
            name, p.batch, p.seq, p.heads, p.kv_heads, p.head_dim, q.dtype, p.causal,
            "fwd+bwd" if plan.backward else "fwd", g.world, plan.layout, m.name, shown, timed,
        )
    return name


def auto_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> tuple:
    """``algorithm="auto"``: q (B, S_l, H, D), k/v (B, S_l, H_kv, D) shards -> (out (B, S_l, H, D),
    lse, [the chosen schedule's kept tensors packed, (n,) uint8])."""
    name = _choose(q, k, v, plan)
    out, lse, kept = SCHEDULES[name].forward(q, k, v, plan)
    return out, lse, [pack(kept) if kept else torch.empty(0, dtype=torch.uint8, device=q.device)]


def auto_backward(dout, q, k, v, out, lse, kept, plan: RingPlan):
    """Gradients through the schedule :func:`auto_forward` ran (the problem's cached choice)."""
    name = _choose(q, k, v, plan)
    specs = SCHEDULES[name].kept(q, k, plan.groups.rank, plan.groups.world, ())
    if nbytes(specs) != kept[0].numel():
        raise RuntimeError(f"auto: the forward kept {kept[0].numel()} bytes, {name!r} needs {nbytes(specs)}: was the "
                           f"choice forgotten (auto._CHOICES cleared) between forward and backward?")
    return SCHEDULES[name].backward(dout, q, k, v, out, lse, unpack(kept[0], specs) if specs else [], plan)


def _auto_kept(q: torch.Tensor, k: torch.Tensor, rank: int, world: int, options: tuple[int, ...]) -> list[Spec]:
    return [((None,), torch.uint8)]


auto_pass = Pass(auto_forward, auto_backward, _auto_kept)
