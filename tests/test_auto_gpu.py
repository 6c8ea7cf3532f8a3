"""``auto`` on GPUs: the preset follows the GPU's name, unknown GPUs and simulated presets measure a
wider shortlist, and tuning times device work (queue drained around each run), not kernel launches."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from ringrt.ops import timing as devtime
from ringrt.schedules import auto
from ringrt.schedules import costmodel
from ringrt.schedules.base import Pass


@pytest.mark.parametrize("name,preset", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H800", "h800"), ("NVIDIA H200", "h100"), ("NVIDIA GH200 480GB", "h100"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A10", "a10"), ("NVIDIA L4", None), ("Tesla V100-SXM2-16GB", None),
])
def test_gpu_preset_follows_the_device_name(name, preset):
    assert auto.gpu_preset(name) == preset


def test_machine_for_cuda_reads_the_gpu_and_rejects_unknown_presets(monkeypatch, caplog):
    monkeypatch.setattr(auto, "_MACHINES", {})
    monkeypatch.delenv("RINGRT_MACHINE", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert auto.machine_for(torch.device("cuda", 0)) is costmodel.PRESETS["a100"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    with caplog.at_level("WARNING", logger="ringrt.auto"):
        assert auto.machine_for(torch.device("cuda", 1)) is costmodel.PRESETS["h100"]
    assert "no cost-model preset describes 'NVIDIA L4'" in caplog.text
    monkeypatch.setenv("RINGRT_MACHINE", "a10")
    assert auto.machine_for(torch.device("cuda", 2)) is costmodel.PRESETS["a10"]
    monkeypatch.setenv("RINGRT_MACHINE", "h1OO")
    with pytest.raises(ValueError, match=r"RINGRT_MACHINE='h1OO' is not a known preset; valid: a10, a100, cpu, h100, h800"):
        auto.machine_for(torch.device("cuda", 3))


def test_simulated_presets_measure_a_wider_shortlist():
    p = costmodel.Problem(batch=1, seq=32768, heads=32, kv_heads=8, head_dim=128, dtype_bytes=2, causal=True,
                          backward=True, layout="zigzag")
    ests = costmodel.rank_schedules(p, costmodel.PRESETS["h100"], 8)
    narrow, wide = auto.shortlist(ests, auto.TUNE_MARGIN), auto.shortlist(ests, auto.TUNE_MARGIN_SIMULATED)
    assert narrow == wide[: len(narrow)] and len(wide) >= len(narrow)
    assert wide == [e.schedule for e in ests if e.total <= (1 + auto.TUNE_MARGIN_SIMULATED) * ests[0].total][: auto.TUNE_MAX]


def test_tuning_times_each_run_with_the_device_queue_drained(monkeypatch):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    events = []
    monkeypatch.setattr(devtime, "sync", lambda device: events.append(("sync", device.type)))
    runs = {n: Pass(lambda q, k, v, plan, n=n: events.append(("run", n)) or (q, None, []), None) for n in ("ring", "ulysses")}
    monkeypatch.setattr(auto, "SCHEDULES", runs)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        plan = types.SimpleNamespace(groups=types.SimpleNamespace(base=None, rank=0, world=2), timeout=5.0)
        q = torch.zeros(1, 4, 2, 8)
        measured = auto._tune(["ring", "ulysses"], q, q, q, plan, backward=False)
    finally:
        dist.destroy_process_group()
    assert set(measured) == {"ring", "ulysses"}
    runs = [i for i, e in enumerate(events) if e[0] == "run"]
    assert len(runs) == 2 * auto.TUNE_ROUNDS
    for i in runs:  # every timed run is bracketed by device syncs on q's device
        assert events[i - 1] == ("sync", "cpu") and events[i + 1] == ("sync", "cpu")
