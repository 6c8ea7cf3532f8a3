"""The GPU acceptance command on the CPU: SKIP without CUDA, PASS on the CPU kernel and gloo ranks,
FAIL when a kernel breaks the contract; its FLOP counts and peaks; device-aware timing."""

from __future__ import annotations

import json

import pytest
import torch

from ringrt.ops import timing as devtime
from ringrt.gpucheck import cli, kernels, throughput
from ringrt.ops.kernels import CpuKernel


def test_without_cuda_it_says_skip_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "g.json"
    rc = cli.main(cli.argparse.Namespace(device="auto", quick=True, world=None, out=str(out)))
    line = capsys.readouterr().out.strip()
    assert rc == 0 and line.startswith("gpucheck: SKIP: no CUDA device") and line.count("\n") == 0
    assert json.loads(out.read_text())["verdict"] == "SKIP"
    with pytest.raises(SystemExit, match="--device cuda"):
        cli.main(cli.argparse.Namespace(device="cuda", quick=True, world=None, out=str(out)))


@pytest.mark.timeout(240)
def test_quick_cpu_run_passes_every_check(tmp_path, capsys, monkeypatch):
    import ringrt

    monkeypatch.setenv("RINGRT_DEVICE", "cpu")  # main sets it for --device cpu; restored after the test

    out = tmp_path / "g.json"
    rc = cli.main(cli.argparse.Namespace(device="cpu", quick=True, world=2, out=str(out)))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(out.read_text())
    assert rc == 0 and res["verdict"] == "PASS" and line.startswith("gpucheck: PASS on cpu"), line
    assert len(res["kernels"]) == len(kernels.cases(True)) * len(cli.DTYPES["cpu"])
    assert {r["check"].split()[0] for r in res["schedules"]} == set(ringrt.ALGORITHMS) | {"lambda"}
    assert sum("packed documents" in r["check"] for r in res["schedules"]) == len(ringrt.ALGORITHMS)  # quick: fp32 only
    assert res["probe"]["ok"] and res["probe"]["world_size"] == 2
    assert res["demo"]["final_loss"] < res["demo"]["first_loss"]
    assert res["throughput"]["fwd_bwd_tflops"] > 0 and res["throughput"]["fraction_of_peak"] is None


class _ScaledOut(CpuKernel):
    """A kernel 0.1 % off: beyond what a same-precision computation explains."""

    def forward(self, q, k, v, *, causal, mask, scale):
        out, lse = super().forward(q, k, v, causal=causal, mask=mask, scale=scale)
        return out * 1.001, lse


class _RawEmptyRows(CpuKernel):
    """aten's CPU kernel without the fix-up: lse = 0 (weight e^0) for rows that see no key."""

    def forward(self, q, k, v, *, causal, mask, scale):
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return op(q, k, v, 0.0, causal, attn_mask=mask.to(q.dtype) if mask is not None else None, scale=scale)


@pytest.mark.parametrize("bad", [_ScaledOut, _RawEmptyRows])
def test_a_kernel_off_the_contract_fails_the_check(monkeypatch, bad):
    monkeypatch.setattr(kernels, "get_kernel", lambda device: bad())
    case = kernels.Case("mask with empty rows", 1, 2, 2, 20, 45, 16, False, "band_empty")
    assert kernels.check_case(case, torch.float32, torch.device("cpu"))["ok"] is False
    monkeypatch.setattr(kernels, "get_kernel", lambda device: CpuKernel())
    assert kernels.check_case(case, torch.float32, torch.device("cpu"))["ok"] is True


def test_flop_counts_and_peaks():
    assert throughput.attention_flops(2, 16, 8192, 8192, 128, causal=False) == (4.0 * 2 * 16 * 8192 * 8192 * 128,
                                                                                 2.5 * 4.0 * 2 * 16 * 8192 * 8192 * 128)
    assert throughput.attention_flops(1, 1, 10, 10, 8, causal=True)[0] == 4.0 * 10 * 10 * 8 / 2
    assert throughput.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert throughput.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert throughput.peak_tflops("NVIDIA H200") == 989.0
    assert throughput.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert throughput.peak_tflops("NVIDIA A10") == 125.0
    assert throughput.peak_tflops("NVIDIA A10G") == 70.0
    assert throughput.peak_tflops("Some Future GPU") is None


def test_device_timing_drains_the_cuda_queue_around_the_work(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", device)))
    devtime.elapsed(lambda: calls.append("work"), torch.device("cuda", 1))
    assert calls == [("sync", torch.device("cuda", 1)), "work", ("sync", torch.device("cuda", 1))]
    calls.clear()
    devtime.elapsed(lambda: calls.append("work"), torch.device("cpu"))
    assert calls == ["work"]
