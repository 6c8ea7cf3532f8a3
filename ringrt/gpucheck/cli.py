"""``ringrt gpucheck``: run the GPU acceptance check; one verdict line, a JSON file, exit 0 on PASS.

    ringrt gpucheck                      # on a GPU machine (< 10 minutes on one H100-class GPU)
    ringrt gpucheck --device cpu --quick # the same checks on the CPU, small (how CI tests it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = {"cuda": ["float16", "bfloat16", "float32", "float64"], "cpu": ["bfloat16", "float32", "float64"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when available, else print SKIP and exit 0 (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="small shapes and few steps (seconds on a CPU)")
    p.add_argument("--world", type=int, default=None,
                   help="ranks for the multi-rank checks (default: 4 or 2 GPUs when that many exist, else none; "
                        "with --device cpu: 0 = none)")
    p.add_argument("--out", default="gpucheck.json", help="JSON result (default %(default)s)")


def _write(path: str, result: dict) -> None:
    from ..run.rundir import atomic_write_json

    atomic_write_json(path, result)


def _demo(device: torch.device, quick: bool, work: str) -> dict:
    """Train the demo model briefly and evaluate it, in this process, on ``device``."""
    import dataclasses

    from ..jobs.config import DemoConfig, EvalJobConfig, TrainJobConfig
    from ..jobs.eval import run_eval
    from ..jobs.train import run_train

    d = DemoConfig()
    steps = 8 if quick else 120
    train = dataclasses.replace(d.train, steps=steps, out_dir=os.path.join(work, "train"), progress=False,
                                log_every=max(1, steps // 4), warmup_steps=min(d.train.warmup_steps, steps // 2))
    t0 = time.perf_counter()
    out = run_train(TrainJobConfig(model=d.model, attention=d.attention, data=d.data, train=train))
    t1 = time.perf_counter()
    ev = dataclasses.replace(d.eval, checkpoint=out["hf_dir"], out_dir=os.path.join(work, "eval"), train_len=d.data.seq_len,
                             multiples=[1, 4], tokens=2048 if quick else 8192)
    res = run_eval(EvalJobConfig(attention=d.attention, data=d.data, eval=ev), print_fn=lambda *a, **k: None)
    losses = out["losses"]
    ppl = res["perplexity"]
    flat = [x for mode in ppl.values() for x in (mode.values() if isinstance(mode, dict) else [mode])]
    finite = all(map(lambda x: x == x and abs(x) != float("inf"), losses + flat))
    learned = len(losses) >= 2 and losses[-1] < losses[0]
    return {"ok": finite and learned, "device": str(device), "steps": out["step"], "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "perplexity": ppl, "train_s": t1 - t0,
            "eval_s": time.perf_counter() - t1}


def _probe(world: int, work: str) -> dict:
    """``ringrt probe`` under torchrun on ``world`` local processes (one GPU each on a GPU machine)."""
    from ..distributed.launcher import LOCAL_TORCHRUN_ENV, local_torchrun_args

    path = os.path.join(work, "probe.json")
    # One node, loopback only (not --standalone, whose agent listens on every interface).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={world}",
           *local_torchrun_args(os.path.join(work, "rendezvous")), "-m", "ringrt.jobs.probe", "--out", path]
    env = dict(os.environ, OMP_NUM_THREADS="1", **LOCAL_TORCHRUN_ENV)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "ringrt probe did not finish within 300 s", "command": " ".join(cmd)}
    if proc.returncode != 0 or not os.path.exists(path):
        return {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}", "command": " ".join(cmd)}
    with open(path) as f:
        got = json.load(f)
    return {"ok": bool(got["ok"]), "world_size": got["world_size"], "ranks": got["ranks"]}


def _default_world(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    n = torch.cuda.device_count()
    return 4 if n >= 4 else (2 if n >= 2 else 0)


def run_check(device: torch.device, *, quick: bool, world: int) -> dict:
    """Every check on ``device``; the result dict (``verdict`` PASS or FAIL)."""
    from ..distributed.spawn import run_local
    from . import kernels, ranks, throughput

    t0 = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "quick": quick, "world": world}
    dtypes = [getattr(torch, n) for n in DTYPES[device.type]]
    result["kernels"] = kernels.check_kernels(device, dtypes, quick)
    shape = dict(batch=1, heads=4, seq=512, head_dim=32) if quick else dict(batch=2, heads=16, seq=8192, head_dim=128)
    tp_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result["throughput"] = throughput.measure(device, tp_dtype, reps=3 if quick else 10, **shape)
    with tempfile.TemporaryDirectory(prefix="ringrt_gpucheck_") as work:
        result["demo"] = _demo(device, quick, work)
        if world >= 2:
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            cfg = {"per_rank": 16 if quick else 256, "heads": 8, "kv_heads": 2, "head_dim": 16 if quick else 64,
                   "dtypes": ["float32"] if quick else ["bfloat16", "float32"]}
            per_rank = run_local(ranks.schedules_worker, world, cfg, timeout=600.0, backend=backend)
            result["schedules"] = [dict(row, ok=all(r[i]["ok"] for r in per_rank),
                                        max_abs_err={n: max(r[i]["max_abs_err"][n] for r in per_rank) for n in row["max_abs_err"]})
                                   for i, row in enumerate(per_rank[0])]
            result["probe"] = _probe(world, work)
    parts = [all(r["ok"] for r in result["kernels"]), result["demo"]["ok"]]
    if world >= 2:
        parts += [all(r["ok"] for r in result["schedules"]), result["probe"]["ok"]]
    result["verdict"] = "PASS" if all(parts) else "FAIL"
    result["seconds"] = time.perf_counter() - t0
    return result


def summary(result: dict, out: str) -> str:
    """The one verdict line."""
    if result["verdict"] == "SKIP":
        return f"gpucheck: SKIP: {result['reason']} -> {out}"
    k = result["kernels"]
    tp = result["throughput"]
    frac = f" = {tp['fraction_of_peak']:.2f} of the {tp['peak_tflops']:.0f} TFLOP/s peak" if tp["fraction_of_peak"] else ""
    d = result["demo"]
    bits = [f"kernels {sum(r['ok'] for r in k)}/{len(k)}",
            f"demo loss {d['first_loss']:.3f} -> {d['final_loss']:.3f} in {d['steps']} steps" + ("" if d["ok"] else " (FAILED)"),
            f"kernel {tp['fwd_bwd_tflops']:.3g} TFLOP/s fwd+bwd {tp['dtype']} ({tp['path']}){frac}"]
    if "schedules" in result:
        s = result["schedules"]
        bits.append(f"{result['world']} ranks: schedules {sum(r['ok'] for r in s)}/{len(s)}, probe {'ok' if result['probe']['ok'] else 'FAILED'}")
    return f"gpucheck: {result['verdict']} on {result['device']}: " + "; ".join(bits) + f" ({result['seconds']:.0f} s) -> {out}"


def main(args: argparse.Namespace) -> int:
    if args.device == "auto" and not torch.cuda.is_available():
        result = {"verdict": "SKIP", "reason": "no CUDA device (torch.cuda.is_available() is False); "
                  "`ringrt gpucheck --device cpu --quick` runs the same checks on the CPU"}
        _write(args.out, result)
        print(summary(result, args.out), flush=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpucheck: --device cuda was asked for, but torch.cuda.is_available() is False")
    if args.device == "cpu":
        os.environ["RINGRT_DEVICE"] = "cpu"  # the jobs of the demo check, and the spawned ranks, stay on the CPU
    device = torch.device("cuda", torch.cuda.current_device()) if args.device != "cpu" else torch.device("cpu")
    world = _default_world(device) if args.world is None else args.world
    if world == 1 or world < 0:
        raise SystemExit(f"gpucheck: --world={world} must be 0 (no multi-rank checks) or >= 2")
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise SystemExit(f"gpucheck: --world={world} needs {world} GPUs; {torch.cuda.device_count()} visible")
    result = run_check(device, quick=args.quick, world=world)
    _write(args.out, result)
    print(summary(result, args.out), flush=True)
    return 0 if result["verdict"] == "PASS" else 1
