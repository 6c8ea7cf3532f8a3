"""Per-step compute / communication / overlap model of every attention schedule. Pure math.

An estimate walks the same integer step tables the schedules run (``tokenring_plan.tokenring_schedule``,
``blocks.chunk_blocks``) and prices each step of each rank:

    kernel call   t = overhead + flops / (peak_D * m / (m + m_half_D)),  m = min(query rows, key rows)
                  flops = 4*B*H*D*area, area = sq*sk, or what the kernel's tiling computes of a
                  diagonal block (``tiling.computed_area``: 1/2 ideal, whole key tiles on aten's CPU
                  kernel); backward x 2.5 at bwd_peak_D. peak_D, bwd_peak_D, m_half_D are calibrated
                  per head_dim D (``Machine.kernel_rates``) and interpolated in log2(D) between them.
    merge         t = 8 * B*H*sq*D*4 bytes / mem_bw      (the fp32 out/lse update, memory bound)
    message       t = latency + bytes / bandwidth of the link it crosses (intra- or inter-node)
    step          t = compute + comm - overlap * min(compute, comm)
    call          t = sum of steps + per-call overhead + linear cost * shard bytes (per schedule, W, fwd | fwd+bwd)

Ranks run in lockstep, so a step lasts as long as its slowest rank; a pass is the sum of its steps.
The per-call overhead (Python, the input agreement across ranks, packing, autograd, waking the
ranks) is calibrated by timing tiny calls of every schedule (``simulate.overhead``); without a
calibration it is zero. The linear cost of each schedule at each W is what a mid-size call measures
beyond its overhead and priced steps, per byte of the rank's q, k and v shards, on a problem the
benchmark grid does not contain (``Machine.linear_costs``; none for the GPU presets and without a
calibration): it grows with the shard, so it fades against the O(S^2) work of long sequences.
Collectives (all-gather, all-to-all, reduce-scatter) are not overlapped. CPU ranks on one node share
its cores: each rank gets 1 / slowdown(ranks) of its calibrated rates, the slowdown measured by
running lockstep kernel + exchange steps on that many ranks at once for the ring schedules
(``Machine.slowdowns``) and one kernel call per rank for the single-step ones, Ulysses and
all-gather (``Machine.burst_slowdowns``; ``simulate.sharing``; on a 2-core box about 2.1 at 4
ranks for a burst, 2.5 to 2.7 for steps); without a measurement, min(1, cores / (ranks * threads)).

All numbers are estimates for the machine described; presets for GPUs are simulation, not
measurement (their sources are given next to them). The CPU machine is calibrated from measured
runs (``ringrt simulate calibrate``); ``auto`` loads it (``auto.load_machine``). Nothing here reads
the environment or a file: settings (the hybrid's Ulysses degree) come in as arguments.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Literal

from ..ops.layout import local_chunks, rank_chunks
from .blocks import Block, Rows, chunk_blocks, n_rows
from .hybrid import hybrid_degree
from .tiling import Tiling, computed_area
from .tokenring_plan import SPLIT_MIN_SCORES, block_for, head_pieces, n_pieces
from .ulysses import ulysses_problem

ScheduleName = Literal["tokenring", "ring", "allgather", "ulysses", "hybrid"]
SCHEDULES: tuple[str, ...] = ("tokenring", "ring", "allgather", "ulysses", "hybrid")
BWD_FLOP_FACTOR = 2.5  # backward = 5 matmuls of the block's size, forward = 2
MERGE_PASSES = 8  # fp32 bytes touched per output element by one merge (read/write out, temporaries)


@dataclass(kw_only=True, slots=True)
class Problem:
    """One attention call: the full (global) sequence split over ``world`` ranks."""

    batch: int = 1
    seq: int
    """Global sequence length (tokens over all ranks)."""
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    causal: bool = True
    backward: bool = False
    """Estimate forward + backward (True) or forward only."""
    layout: Literal["contiguous", "zigzag"] | None = None
    """Shard layout; default zigzag when causal, contiguous otherwise."""
    work_fraction: float = 1.0
    """Share of each block's score entries the kernel computes: sum c_i^2 / C^2 over packed
    documents (``ringrt/ops/documents.py``: each block splits into its documents), 1 for one sequence."""


@dataclass(kw_only=True, slots=True)
class Link:
    bandwidth: float
    """Bytes per second, per direction, one rank's share of the link."""
    latency: float
    """Seconds per message."""
    duplex: bool = True
    """Both directions at full bandwidth at once."""
    per_peer: bool = False
    """Every pair of ranks has a link of its own (a full mesh of links): an all-to-all's pieces to
    different peers travel at once. False: they go one after another at ``bandwidth``."""
    shared_egress: bool = False
    """One uplink per rank (a NIC behind a switch): a rank's concurrent sends to different peers
    share ``bandwidth``. False: sends to different peers do not slow each other."""


@dataclass(kw_only=True, slots=True)
class KernelRate:
    """Block-kernel rates measured at one head_dim."""

    head_dim: int
    peak: float
    """Forward FLOP/s at large blocks."""
    bwd_peak: float
    """Backward FLOP/s at large blocks (FLOPs counted as 2.5 x forward)."""
    m_half: float
    """Block rows at which the forward kernel reaches half its peak."""


@dataclass(kw_only=True, slots=True)
class CallOverhead:
    """Seconds one call of ``schedule`` costs beyond its priced steps, measured at ``world`` ranks."""

    schedule: str
    world: int
    backward: bool
    """True: a forward + backward call; False: forward only."""
    seconds: float


@dataclass(kw_only=True, slots=True)
class LinearCost:
    """Seconds per byte of a rank's q, k and v shards that one call of ``schedule`` at ``world`` ranks
    costs beyond its priced steps and per-call overhead, measured on a mid-size call: fresh buffers
    (page faults), copies and Python that grow with the shards, not with the attention's O(S^2) work."""

    schedule: str
    world: int
    backward: bool
    seconds_per_byte: float


@dataclass(kw_only=True, slots=True)
class RankSlowdown:
    """Measured: a kernel call takes ``factor`` x its single-rank time when ``ranks`` ranks of a node
    run it at the same time (lockstep, time of the slowest)."""

    ranks: int
    factor: float


@dataclass(kw_only=True, slots=True)
class Machine:
    name: str
    peak: float
    """Forward block-kernel FLOP/s per rank at large blocks."""
    bwd_peak: float
    """Backward block-kernel FLOP/s per rank (FLOPs counted as 2.5 x forward)."""
    m_half: float = 256.0
    """Block rows at which the kernel reaches half its peak."""
    overhead: float = 10e-6
    """Seconds per kernel call."""
    mem_bw: float
    """Bytes/s of elementwise work (merges, packing)."""
    intra: Link
    inter: Link | None = None
    ranks_per_node: int = 8
    overlap: float = 1.0
    """Fraction of min(compute, comm) hidden in a step (1: DMA engines; less on CPU)."""
    cores: int | None = None
    """Cores shared by the ranks of a node (CPU); None: one device per rank."""
    threads: int = 1
    simulated: bool = True
    """True for described hardware (a projection), False when calibrated on this machine."""
    source: str = ""
    kernel_rates: tuple[KernelRate, ...] = ()
    """Calibrated per head_dim; empty: ``peak``, ``bwd_peak``, ``m_half`` at every head_dim."""
    tiling: Tiling = "ideal"
    """How the block kernel covers a causal block (``tiling.computed_area``)."""
    call_overheads: tuple[CallOverhead, ...] = ()
    """Measured per schedule, world size and pass; empty: no per-call overhead."""
    linear_costs: tuple[LinearCost, ...] = ()
    """Measured per schedule, world size and pass on a held-out problem; empty: none."""
    slowdowns: tuple[RankSlowdown, ...] = ()
    """Measured per number of ranks sharing a node, lockstep kernel + exchange steps (ring schedules);
    empty: the ``cores`` formula."""
    burst_slowdowns: tuple[RankSlowdown, ...] = ()
    """Measured likewise for one kernel call per rank with no exchange in between (single-step
    schedules: Ulysses, all-gather); empty: ``slowdowns``."""


@dataclass(kw_only=True, slots=True)
class Estimate:
    schedule: str
    world: int
    total: float
    compute: float
    comm: float
    exposed_comm: float
    overhead: float = 0.0
    """The per-call overhead and linear cost included in ``total``."""
    steps: list[tuple[float, float]] = field(default_factory=list)
    """(compute, comm) of the slowest rank at each step of the forward pass."""
    note: str = ""


# ------------------------------------------------------------------------------------------------
# Presets. GPU numbers: achieved (not peak) rates reported for FlashAttention-2 and NCCL; simulation.
# ------------------------------------------------------------------------------------------------

GBs = 1e9

PRESETS: dict[str, Machine] = {
    # H800 SXM: FA2 bf16 ~ 350 TFLOP/s fwd / 280 bwd (H100-class); NVLink 400 GB/s bidirectional
    # (H800 cut) -> ~160 GB/s achieved per direction; HBM3 3.35 TB/s (~2.4 achieved); IB 8x400 Gb/s.
    "h800": Machine(name="8xH800 SXM (NVLink) + IB", peak=350e12, bwd_peak=280e12, m_half=512, overhead=15e-6,
                    mem_bw=2.4e12, intra=Link(bandwidth=160 * GBs, latency=15e-6),
                    inter=Link(bandwidth=45 * GBs, latency=25e-6), ranks_per_node=8,
                    source="FA2 paper/benchmarks, NVIDIA H800 datasheet; simulation"),
    # A100 SXM: FA2 bf16 ~ 190 TFLOP/s fwd / 150 bwd; NVLink3 600 GB/s bidir -> ~230 per direction.
    "a100": Machine(name="8xA100 SXM (NVLink) + IB", peak=190e12, bwd_peak=150e12, m_half=512, overhead=15e-6,
                    mem_bw=1.5e12, intra=Link(bandwidth=230 * GBs, latency=15e-6),
                    inter=Link(bandwidth=22 * GBs, latency=25e-6), ranks_per_node=8,
                    source="FA2 paper, NVIDIA A100 datasheet; simulation"),
    # A10 (PCIe 4.0 x16 behind a switch, no NVLink): FA2 ~ 70 TFLOP/s fwd; P2P ~ 13.2 GB/s per direction.
    "a10": Machine(name="4xA10 PCIe switch", peak=70e12, bwd_peak=55e12, m_half=512, overhead=15e-6,
                   mem_bw=0.5e12, intra=Link(bandwidth=13.2 * GBs, latency=30e-6), ranks_per_node=4,
                   source="A10 datasheet, PCIe 4.0 x16 P2P; simulation"),
    # Nodes of 8 H100 (NVLink4 900 GB/s bidir -> ~360 per direction achieved), IB NDR 400 Gb/s per GPU.
    "h100": Machine(name="H100 nodes of 8 (NVLink) + IB NDR", peak=350e12, bwd_peak=280e12, m_half=512,
                    overhead=15e-6, mem_bw=2.4e12, intra=Link(bandwidth=360 * GBs, latency=15e-6),
                    inter=Link(bandwidth=45 * GBs, latency=25e-6), ranks_per_node=8,
                    source="NVIDIA H100 datasheet, FA2/NCCL benchmarks; simulation"),
    # This kind of box when no calibration file exists: 1-thread fp32 flash kernel, gloo over loopback.
    "cpu": Machine(name="CPU, gloo (uncalibrated defaults)", peak=20e9, bwd_peak=12e9, m_half=64, overhead=30e-6,
                   mem_bw=4e9, intra=Link(bandwidth=1.5 * GBs, latency=150e-6), ranks_per_node=64, overlap=0.3,
                   cores=os.cpu_count() or 1, threads=1, simulated=False, source="defaults", tiling="aten_cpu"),
}


def machine_to_dict(m: Machine) -> dict:
    return asdict(m)


def machine_from_dict(d: dict) -> Machine:
    d = dict(d)
    d["intra"] = Link(**d["intra"])
    d["inter"] = Link(**d["inter"]) if d.get("inter") else None
    d["kernel_rates"] = tuple(KernelRate(**r) for r in d.get("kernel_rates", ()))
    d["call_overheads"] = tuple(CallOverhead(**c) for c in d.get("call_overheads", ()))
    d["linear_costs"] = tuple(LinearCost(**c) for c in d.get("linear_costs", ()))
    d["slowdowns"] = tuple(RankSlowdown(**x) for x in d.get("slowdowns", ()))
    d["burst_slowdowns"] = tuple(RankSlowdown(**x) for x in d.get("burst_slowdowns", ()))
    return Machine(**d)


# ------------------------------------------------------------------------------------------------
# Pricing primitives.
# ------------------------------------------------------------------------------------------------


def _share(m: Machine, ranks_on_node: int, *, stepped: bool = True) -> float:
    """Fraction of its calibrated rates a rank gets with ``ranks_on_node`` ranks busy on its node,
    in lockstep ring steps (``stepped``) or in one uninterrupted kernel call."""
    table = m.slowdowns if stepped or not m.burst_slowdowns else m.burst_slowdowns
    if table:
        return 1.0 / _interpolate([(x.ranks, x.factor) for x in table], max(1, ranks_on_node), floor=1.0)
    if m.cores is None:
        return 1.0
    return min(1.0, m.cores / (max(1, ranks_on_node) * m.threads))


def _interpolate(pts: list[tuple[int, float]], x: int, *, floor: float) -> float:
    """The value at ``x`` if measured, else linear through the two nearest measured points (one point:
    its value), never below ``floor``."""
    pts = sorted(pts)
    for px, y in pts:
        if px == x:
            return y
    if len(pts) == 1:
        return pts[0][1]
    (x0, y0), (x1, y1) = sorted(pts, key=lambda p: (abs(p[0] - x), p[0]))[:2]
    return max(floor, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def rate_at(m: Machine, head_dim: int) -> KernelRate:
    """Kernel rates at ``head_dim``: the calibrated point, linear in log2(D) between two, the nearest
    one outside their range; ``m.peak``/``m.bwd_peak``/``m.m_half`` when none are calibrated."""
    pts = sorted(m.kernel_rates, key=lambda r: r.head_dim)
    if not pts:
        return KernelRate(head_dim=head_dim, peak=m.peak, bwd_peak=m.bwd_peak, m_half=m.m_half)
    if head_dim <= pts[0].head_dim:
        return pts[0]
    if head_dim >= pts[-1].head_dim:
        return pts[-1]
    hi = next(i for i, r in enumerate(pts) if r.head_dim >= head_dim)
    a, b = pts[hi - 1], pts[hi]
    f = (math.log2(head_dim) - math.log2(a.head_dim)) / (math.log2(b.head_dim) - math.log2(a.head_dim))
    mix = lambda x, y: x + f * (y - x)  # noqa: E731
    return KernelRate(head_dim=head_dim, peak=mix(a.peak, b.peak), bwd_peak=mix(a.bwd_peak, b.bwd_peak),
                      m_half=mix(a.m_half, b.m_half))


def kernel_time(m: Machine, p: Problem, sq: int, sk: int, heads: int, *, diagonal: bool, backward: bool, share: float = 1.0) -> float:
    """Seconds of one block-kernel call over sq x sk tokens and ``heads`` query heads."""
    flops = 4.0 * p.batch * heads * p.head_dim * computed_area(sq, sk, causal=diagonal, tiling=m.tiling) * p.work_fraction
    r = rate_at(m, p.head_dim)
    mm = min(sq, sk)
    eff = mm / (mm + r.m_half)
    if backward:
        return m.overhead + BWD_FLOP_FACTOR * flops / (r.bwd_peak * share * eff)
    return m.overhead + flops / (r.peak * share * eff)


def call_overhead(m: Machine, schedule: str, world: int, backward: bool) -> float:
    """Per-call overhead of ``schedule`` at ``world`` ranks: the measured value at that W, linear in W
    through the two nearest measured W otherwise (never below 0), the only one if one was measured."""
    pts = [(c.world, c.seconds) for c in m.call_overheads if c.schedule == schedule and c.backward == backward]
    if world <= 1 or not pts:
        return 0.0
    return _interpolate(pts, world, floor=0.0)


def linear_cost(m: Machine, schedule: str, world: int, p: Problem) -> float:
    """Seconds of the size-linear cost of one call (``Machine.linear_costs``; linear in W between
    measured W, the only one if one was measured); 0 when none was measured or W = 1."""
    pts = [(c.world, c.seconds_per_byte) for c in m.linear_costs if c.schedule == schedule and c.backward == p.backward]
    if world <= 1 or not pts:
        return 0.0
    return _interpolate(pts, world, floor=0.0) * shard_bytes(p, world)


def shard_bytes(p: Problem, world: int) -> float:
    """Bytes of one rank's q, k and v shards."""
    return p.batch * (p.seq / world) * (p.heads + 2 * p.kv_heads) * p.head_dim * p.dtype_bytes


def merge_time(m: Machine, p: Problem, sq: int, heads: int, share: float = 1.0) -> float:
    return MERGE_PASSES * p.batch * heads * sq * p.head_dim * 4 / (m.mem_bw * share)


def copy_time(m: Machine, nbytes: float, share: float = 1.0) -> float:
    """Packing / unpacking / reordering: read + write."""
    return 2.0 * nbytes / (m.mem_bw * share)


def msg_time(link: Link, nbytes: float) -> float:
    return link.latency + nbytes / link.bandwidth if nbytes > 0 else 0.0


def _link(m: Machine, a: int, b: int) -> Link:
    if m.inter is None or a // m.ranks_per_node == b // m.ranks_per_node:
        return m.intra
    return m.inter


def sample_ranks(world: int, per_node: int) -> list[int]:
    """Ranks whose steps are priced. Every rank for small W; beyond 16, the ring's ends, the middle
    and both sides of the first node boundaries: with contiguous or zigzag shards every rank's
    per-step work equals one of these, and the node-crossing links are among them."""
    if world <= 16:
        return list(range(world))
    picks = {0, 1, 2, world // 2 - 1, world // 2, world - 2, world - 1}
    for b in (per_node, 2 * per_node):
        picks.update({b - 1, b, b + 1})
    return sorted(r for r in picks if 0 <= r < world)


def _step(m: Machine, compute: float, comm: float) -> float:
    return compute + comm - m.overlap * min(compute, comm)


def _slowest_steps(m: Machine, world: int, ranks: list[int], cost) -> tuple[float, float, float, list]:
    """Sum over the W steps of the slowest sampled rank's step: cost(step, rank) -> (compute, comm).

    Returns (total, compute, comm, [(compute, comm) of the slowest rank at each step]).
    """
    total = comp_sum = comm_sum = 0.0
    steps = []
    for s in range(world):
        t, comp, comm = max(((_step(m, c, x), c, x) for c, x in (cost(s, r) for r in ranks)), key=lambda w: w[0])
        total, comp_sum, comm_sum = total + t, comp_sum + comp, comm_sum + comm
        steps.append((comp, comm))
    return total, comp_sum, comm_sum, steps


def blocks_time(m: Machine, p: Problem, blocks: list[Block], chunk: int, heads: int, *, backward: bool, share: float) -> float:
    t = 0.0
    for b in blocks:
        sq, sk = n_rows(b.q_rows) * chunk, n_rows(b.k_rows) * chunk
        t += kernel_time(m, p, sq, sk, heads, diagonal=b.diagonal, backward=backward, share=share)
        if not backward:
            t += merge_time(m, p, sq, heads, share)
    return t


def _layout(p: Problem) -> str:
    return p.layout or ("zigzag" if p.causal else "contiguous")


def _elem_acc(p: Problem) -> int:
    return 8 if p.dtype_bytes == 8 else 4


# ------------------------------------------------------------------------------------------------
# Schedules.
# ------------------------------------------------------------------------------------------------


def _kv_ring(m: Machine, p: Problem, world: int, heads: int, kv_heads: int, chunks: list[list[int]], chunk: int,
             members: list[int], share: float, *, backward: bool) -> tuple[float, float, float, list]:
    """(total, compute, comm) of one KV-ring pass over ``members`` (global ranks, for links)."""
    e, a = p.dtype_bytes, _elem_acc(p)
    local = len(chunks[0]) * chunk
    kv_bytes = 2 * p.batch * local * kv_heads * p.head_dim * e
    grad_bytes = 2 * p.batch * local * kv_heads * p.head_dim * a if backward else 0
    def cost(s: int, r: int) -> tuple[float, float]:
        src = (r - s) % world
        comp = blocks_time(m, p, chunk_blocks(chunks[r], chunks[src], p.causal), chunk, heads, backward=backward, share=share)
        nbytes = (kv_bytes if s < world - 1 else 0) + grad_bytes
        link = _link(m, members[r], members[(r + 1) % world])
        comm = msg_time(link, nbytes) + (copy_time(m, nbytes, share) if nbytes else 0.0) if world > 1 else 0.0
        return comp, comm

    return _slowest_steps(m, world, sample_ranks(world, m.ranks_per_node), cost)


def _a2a_time(m: Machine, members: list[int], nbytes: float, share: float) -> float:
    """One all-to-all of a tensor of ``nbytes`` per member over ``members``."""
    u = len(members)
    if u == 1:
        return 0.0
    piece = nbytes / u
    r0 = members[0]
    intra = sum(1 for r in members[1:] if _link(m, r0, r) is m.intra)
    inter = (u - 1) - intra
    t_intra = _pieces_time(m.intra, intra, piece)
    t_inter = _pieces_time(m.inter, inter, piece) if inter and m.inter else 0.0
    return max(t_intra, t_inter) + copy_time(m, nbytes, share)


def _pieces_time(link: Link, n: int, piece: float) -> float:
    """``n`` pieces of ``piece`` bytes to ``n`` different peers over ``link``: at once on a mesh of
    per-pair links, else one after another."""
    if not n:
        return 0.0
    return link.latency + piece / link.bandwidth if link.per_peer else n * link.latency + n * piece / link.bandwidth


def _ring_collective(m: Machine, world: int, piece_bytes: float, share: float) -> float:
    """Ring all-gather / reduce-scatter: W-1 steps of one piece over the slowest ring link."""
    if world == 1:
        return 0.0
    links = [_link(m, r, (r + 1) % world) for r in range(world)]
    slow = min(links, key=lambda l: l.bandwidth)
    return (world - 1) * msg_time(slow, piece_bytes) + copy_time(m, world * piece_bytes, share)


def estimate(schedule: str, p: Problem, m: Machine, world: int, *, ulysses_degree: int | None = None) -> Estimate:
    """Estimated seconds of one call (forward, or forward + backward) of ``schedule`` on ``world`` ranks.

    ``ulysses_degree``: the hybrid's Ulysses degree; None: what ``hybrid.hybrid_degree`` picks for
    ``m.ranks_per_node``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not modelled; valid: {', '.join(SCHEDULES)}")
    layout = _layout(p)
    n_local = local_chunks(layout)
    if p.seq % (n_local * world):
        raise ValueError(f"seq={p.seq} must be a multiple of {n_local * world} for layout={layout!r} at world {world}")
    chunk = p.seq // (n_local * world)
    on_node = min(world, m.ranks_per_node)
    share = (_share(m, on_node), _share(m, on_node, stepped=False))  # (ring steps, single bursts)
    passes = (False, True) if p.backward else (False,)
    parts = [_estimate_pass(schedule, p, m, world, layout, chunk, share, bwd, ulysses_degree) for bwd in passes]
    steps_total = sum(x[0] for x in parts)
    fixed = call_overhead(m, schedule, world, p.backward) + linear_cost(m, schedule, world, p)
    return Estimate(schedule=schedule, world=world, total=steps_total + fixed, compute=sum(x[1] for x in parts),
                    comm=sum(x[2] for x in parts), exposed_comm=steps_total - sum(x[1] for x in parts),
                    overhead=fixed, steps=parts[0][3], note=parts[0][4])


def _estimate_pass(schedule, p, m, world, layout, chunk, shares, bwd, ulysses_degree):
    e, a = p.dtype_bytes, _elem_acc(p)
    share, burst = shares
    chunks = [rank_chunks(layout, r, world) for r in range(world)]
    if schedule == "ring":
        t, c, x, steps = _kv_ring(m, p, world, p.heads, p.kv_heads, chunks, chunk, list(range(world)), share, backward=bwd)
        return t, c, x, steps, ""
    if schedule == "tokenring":
        return _tokenring(m, p, world, layout, chunk, share, bwd)
    if schedule == "allgather":
        local = len(chunks[0]) * chunk
        piece = 2 * p.batch * local * p.kv_heads * p.head_dim * e
        comm = _ring_collective(m, world, piece, burst)
        if bwd:
            comm += _ring_collective(m, world, piece * a / e, burst)
        all_chunks = list(range(n_chunks_total := len(chunks[0]) * world))
        comp = max(blocks_time(m, p, chunk_blocks(chunks[r], all_chunks, p.causal), chunk, p.heads, backward=bwd, share=burst)
                   for r in sample_ranks(world, m.ranks_per_node))
        return comp + comm, comp, comm, [(comp, comm)], f"{n_chunks_total} chunks gathered"
    u = world if schedule == "ulysses" else hybrid_degree(world, p.heads, p.kv_heads, m.ranks_per_node, ulysses_degree)
    return _ulysses_ring(m, p, world, u, layout, chunk, burst if u == world else share, bwd)


def ulysses_valid(heads: int, kv_heads: int, degree: int) -> bool:
    return ulysses_problem(heads, kv_heads, degree) is None


def _ulysses_ring(m, p, world, u, layout, chunk, share, bwd):
    """Ulysses over rows of u ranks, then a KV-ring over the W/u rows (u = W: plain Ulysses)."""
    if not ulysses_valid(p.heads, p.kv_heads, u):
        return float("inf"), float("inf"), 0.0, [], f"heads {p.heads}/{p.kv_heads} do not split over {u}"
    e = p.dtype_bytes
    n = world // u
    local = len(rank_chunks(layout, 0, world)) * chunk
    kvh = max(p.kv_heads, u)
    per_tok = p.batch * p.head_dim * e * local
    row0 = list(range(u))
    # forward: q, k, v in, out back; backward: dout in, dq, dk, dv back
    a2a = 2 * _a2a_time(m, row0, per_tok * p.heads, share) + 2 * _a2a_time(m, row0, per_tok * kvh, share)
    heads_u, kv_u = p.heads // u, kvh // u
    rows_chunks = []
    for g in range(n):
        ids = sorted(c for b in range(u) for c in rank_chunks(layout, g * u + b, world))
        rows_chunks.append(ids)
    if n == 1:
        comp = blocks_time(m, p, chunk_blocks(rows_chunks[0], rows_chunks[0], p.causal), chunk, heads_u, backward=bwd, share=share)
        return comp + a2a, comp, a2a, [(comp, a2a)], f"ulysses degree {u}"
    members = [g * u for g in range(n)]
    t, c, x, steps = _kv_ring(m, p, n, heads_u, kv_u, rows_chunks, chunk, members, share, backward=bwd)
    return t + a2a, c, x + a2a, steps, f"ulysses degree {u} x ring {n}"


def tokenring_traffic(rank: int, world: int, causal: bool, layout: str) -> list[tuple[Block | None, Rows | None, Rows | None, int | None]]:
    """Per step of ``rank``: (the block computed or None, q rows sent, out rows sent, out peer).

    Closed form of ``tokenring_plan.tokenring_schedule`` for the contiguous and zigzag layouts (O(W) instead
    of O(W^2) per rank, so 1024 ranks price in seconds); the tests check both agree.
    At step s the rank sends its own queries to rank t = rank - s - 1 (mod W), which is below it (and
    needs the whole shard) iff s + 1 <= rank, else (causal zigzag) needs only the back half (causal
    contiguous: nothing); non-causal: always the whole shard.
    """
    out = []
    for s in range(world):
        o = (rank + s) % world
        block = block_for(o, rank, world, causal, layout)
        out_rows = block.q_rows if (s > 0 and block is not None) else None
        out.append((block, q_rows_sent(rank, s, world, causal, layout), out_rows, o if out_rows else None))
    return out


def q_rows_sent(rank: int, s: int, world: int, causal: bool, layout: str) -> Rows | None:
    """Rows of its own queries ``rank`` sends at step s (to rank - s - 1), or None: O(1)."""
    if s >= world - 1:
        return None
    if not causal or s + 1 <= rank:
        return (0, local_chunks(layout))
    return (1, 2) if layout == "zigzag" else None


def _tokenring(m, p, world, layout, chunk, share, bwd):
    """One pass as ``tokenring._DirectPass`` runs it (Note [TokenRing overlap]): every query piece
    posted at once, units (piece, step) computed piece-major as their pieces arrive, each partial
    sent home when its unit is done. Priced per sampled rank as a timeline; the pass ends when the
    slowest rank has computed and sent its last partial."""
    e, a = p.dtype_bytes, _elem_acc(p)
    row = p.batch * p.heads * chunk  # (batch x heads) rows of one chunk
    if bwd:
        q_bytes_per_chunk = row * (2 * p.head_dim * e + 2 * a)  # q, dout, lse, delta
        out_bytes_per_chunk = row * p.head_dim * e  # dq partial
    else:
        q_bytes_per_chunk = row * p.head_dim * e
        out_bytes_per_chunk = row * (p.head_dim * e + a)  # out partial + lse
    bundle = local_chunks(layout) * q_bytes_per_chunk
    pieces = len(head_pieces(p.heads, p.kv_heads, n_pieces(bundle))) if world > 1 else 1
    ranks = sample_ranks(world, m.ranks_per_node)
    runs = [_tokenring_rank(m, p, world, layout, chunk, share, bwd, r, pieces, q_bytes_per_chunk, out_bytes_per_chunk)
            for r in ranks]
    total, comp, comm, steps = max(runs, key=lambda x: x[0])
    return total, comp, comm, steps, f"{pieces} piece{'s' if pieces > 1 else ''}"


def _tokenring_rank(m, p, world, layout, chunk, share, bwd, r, pieces, q_chunk_bytes, out_chunk_bytes):
    """(end, compute, comm, [(compute, comm) per step]) of rank ``r``'s timeline in one pass."""
    mine = tokenring_traffic(r, world, p.causal, layout)
    # query bytes rank r receives at step s (from r + s) and sends to r - s (for that rank's step s)
    q_in = [0.0] * world
    q_out = {}  # peer -> bytes of this rank's queries sent to it
    for s in range(1, world):
        o = (r + s) % world
        rows_in = q_rows_sent(o, s - 1, world, p.causal, layout)
        q_in[s] = n_rows(rows_in) * q_chunk_bytes if rows_in else 0.0
        rows_out = mine[s - 1][1]
        if rows_out:
            q_out[(r - s) % world] = n_rows(rows_out) * q_chunk_bytes
    comp_of = [blocks_time(m, p, [b], chunk, p.heads, backward=bwd, share=share) if b is not None else 0.0
               for b, _, _, _ in mine]
    link_in = _link(m, (r + 1) % world, r)
    t = copy_time(m, sum(q_out.values()), share) if world > 1 else 0.0  # packing every query piece up front
    split = 2 if world > 1 and p.heads > 1 and p.batch * p.heads * (n_rows(mine[0][0].q_rows) * chunk) ** 2 >= SPLIT_MIN_SCORES else 1
    t += comp_of[0] / split
    # incoming streams share the rank's downlink unless every pair has its own link; outgoing ones
    # share its uplink behind a switch (``Link.shared_egress``), else each link is free on its own
    shared, uplink = not link_in.per_peer, link_in.shared_egress
    free = {peer: link_in.latency + nb / link_in.bandwidth for peer, nb in q_out.items()}
    up_free = link_in.latency + sum(q_out.values()) / link_in.bandwidth
    in_total = sum(q_in)
    sent_done, comm, steps = 0.0, 0.0, [(comp_of[0], 0.0)]
    for k in range(pieces):
        for s in range(1, world):
            # piece k of step s has arrived: alone on its link, or sharing the downlink with every stream
            arrive = link_in.latency + (k + 1) / pieces * ((in_total if shared else q_in[s]) / link_in.bandwidth)
            block, _, out_rows, owner = mine[s]
            t = max(t, arrive) + comp_of[s] / pieces
            if out_rows is not None:
                nb = n_rows(out_rows) * out_chunk_bytes / pieces
                t += copy_time(m, nb, share)
                link = _link(m, r, owner)
                if uplink:
                    up_free = max(up_free, t) + nb / link.bandwidth
                    done = up_free + link.latency
                else:
                    free[owner] = max(free.get(owner, 0.0), t) + nb / link.bandwidth
                    done = free[owner] + link.latency
                sent_done = max(sent_done, done)
                comm += nb / link.bandwidth
    t += comp_of[0] - comp_of[0] / split  # the own block's second half
    if not bwd:  # merging the partials that came back
        t += sum(merge_time(m, p, n_rows(x[2]) * chunk, p.heads, share) for x in mine if x[2] is not None)
    comm += sum(q_in) / link_in.bandwidth
    for s in range(1, world):
        steps.append((comp_of[s], q_in[s] / link_in.bandwidth))
    compute = sum(comp_of)
    end = max(t, sent_done)
    # compute and transfers share the cores: what the machine cannot overlap comes on top
    end += (1.0 - m.overlap) * min(compute, comm)
    return end, compute, comm, steps


def single_device(p: Problem, m: Machine) -> float:
    """Seconds of the whole problem on one rank of ``m`` (one kernel call, no communication)."""
    t = kernel_time(m, p, p.seq, p.seq, p.heads, diagonal=p.causal, backward=False)
    if p.backward:
        t += kernel_time(m, p, p.seq, p.seq, p.heads, diagonal=p.causal, backward=True)
    return t


def candidates(p: Problem, world: int, ranks_per_node: int, ulysses_degree: int | None = None) -> list[str]:
    """Schedules that can run this problem at this world size (hybrid only when its degree, the set
    ``ulysses_degree`` or the rule's, differs from both a plain ring and plain Ulysses)."""
    out = ["tokenring", "ring", "allgather"]
    if world > 1 and ulysses_valid(p.heads, p.kv_heads, world):
        out.append("ulysses")
    if world > 1:
        u = hybrid_degree(world, p.heads, p.kv_heads, ranks_per_node, ulysses_degree)
        if 1 < u < world:
            out.append("hybrid")
    return out


def rank_schedules(p: Problem, m: Machine, world: int, *, ulysses_degree: int | None = None) -> list[Estimate]:
    """Estimates of every candidate, fastest first (``ulysses_degree`` as in :func:`estimate`)."""
    ests = [estimate(s, p, m, world, ulysses_degree=ulysses_degree)
            for s in candidates(p, world, m.ranks_per_node, ulysses_degree)]
    return sorted(ests, key=lambda x: x.total)

