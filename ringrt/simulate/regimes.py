"""Link settings that put this CPU where a GPU cluster is: the same FLOPs per link byte.

What decides between the schedules is the ratio of a rank's attention FLOP/s to its link's bytes
per second: a schedule that moves fewer bytes wins where a byte costs many FLOPs. Over loopback a
byte costs ~25 FLOPs here, nothing like a GPU's thousands, so ``ringrt bench compare --link`` shapes
emulated links (``links.py``) to the rate that gives this CPU the ratio of a published regime::

    ratio  = GPU attention FLOP/s / GPU link bytes/s          (costmodel.PRESETS: achieved rates)
    rate   = this CPU's kernel FLOP/s per rank / ratio         (the calibration: ``Machine.peak``)

A10 PCIe (the TokenRing paper's 4xA10): 70 TFLOP/s over 13.2 GB/s, ~5300 FLOP/B; an 8xH100 node's
NVLink: 350 TFLOP/s over 360 GB/s, ~970 FLOP/B; InfiniBand NDR between H100 nodes: 350 TFLOP/s
over 45 GB/s, ~7800 FLOP/B. At ~85 GFLOP/s per rank that is ~130, ~700 and ~90 mbit/s.
Pure arithmetic on the presets and a calibrated machine; SIMULATION of the GPU side.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schedules import costmodel as cm


@dataclass(frozen=True, slots=True)
class Regime:
    name: str
    flops: float  # the GPU's attention FLOP/s (forward, achieved)
    link_bytes: float  # its link's bytes per second, per direction
    topology: str  # the emulated wiring that matches it

    @property
    def ratio(self) -> float:
        """FLOPs per link byte."""
        return self.flops / self.link_bytes


def regimes() -> list[Regime]:
    """The published regimes, from ``costmodel.PRESETS``."""
    a10, h100 = cm.PRESETS["a10"], cm.PRESETS["h100"]
    return [
        Regime("4xA10 PCIe switch (TokenRing paper)", a10.peak, a10.intra.bandwidth, "switch"),
        Regime("8xH100 node, NVLink", h100.peak, h100.intra.bandwidth, "mesh"),
        Regime("H100 nodes, InfiniBand NDR", h100.peak, h100.inter.bandwidth, "switch"),
    ]


def equivalent_rate(regime: Regime, cpu_flops: float) -> float:
    """Bytes per second per link direction that give a rank of ``cpu_flops`` the regime's ratio."""
    return cpu_flops / regime.ratio


def link_spec(rate_bytes: float) -> str:
    """``--link`` value for a rate in bytes per second (rounded to whole mbit)."""
    return f"rate={max(1, round(rate_bytes * 8 / 1e6))}mbit,burst=64kb"


def table(machine: cm.Machine) -> list[dict]:
    """One row per regime: its ratio, the equivalent rate on ``machine`` and the ``--link`` to use."""
    rows = []
    for r in regimes():
        rate = equivalent_rate(r, machine.peak)
        rows.append({"regime": r.name, "gpu_tflops": r.flops / 1e12, "gpu_link_GBs": r.link_bytes / 1e9,
                     "flop_per_byte": r.ratio, "cpu_gflops": machine.peak / 1e9, "rate_MBs": rate / 1e6,
                     "link": link_spec(rate), "topology": r.topology})
    return rows
