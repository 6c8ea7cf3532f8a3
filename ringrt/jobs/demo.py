"""``ringrt demo``: the embedded default job, on local CPU ranks, in a few minutes.

1. Train a small Llama (byte-level, Python standard library source as text) at a short context
   (256 tokens), its sequences sharded over the ranks with TokenRing attention.
2. Evaluate perplexity from 1x to 16x the training length, with plain attention and with the
   LM-Infinite Λ-mask: vanilla perplexity blows up past the training length, the Λ-mask stays flat.

It launches its own gloo ranks (``ringrt.distributed.spawn.run_local``), prints the table and writes
``results.json``, ``perplexity.png`` and the trained model under ``--out-dir`` (default outputs/demo).
Running it again reuses the finished training run in that directory (and says so); either way it
ends by naming where the model (Hugging Face format) and the results are. It runs on the CPU even on a
GPU node: its process group is gloo only, so :func:`ringrt.distributed.device.job_device` is the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from .config import DemoConfig, EvalJobConfig, TrainJobConfig


def _worker(rank: int, world: int, cfg: DemoConfig) -> dict:
    from .eval import run_eval
    from .train import run_train

    t0 = time.perf_counter()
    train_dir = os.path.join(cfg.out_dir, "train")
    train = dataclasses.replace(cfg.train, out_dir=train_dir, progress=False)
    out = run_train(TrainJobConfig(model=cfg.model, attention=cfg.attention, data=cfg.data, train=train))
    t1 = time.perf_counter()
    ev = dataclasses.replace(cfg.eval, checkpoint=out["hf_dir"], out_dir=cfg.out_dir, train_len=cfg.data.seq_len)
    res = run_eval(EvalJobConfig(attention=cfg.attention, data=cfg.data, eval=ev))
    return {"train": {k: out[k] for k in ("step", "loss", "tokens_per_s", "hf_dir", "checkpoint", "resumed_from")},
            "trained_steps": len(out["losses"]), "perplexity": res["perplexity"], "results_dir": cfg.out_dir,
            "train_s": t1 - t0, "eval_s": time.perf_counter() - t1}


def summary(r: dict, world: int, total_s: float) -> str:
    """The demo's closing lines: what was trained (or reused), how long it took, where everything is."""
    tr = r["train"]
    if r["trained_steps"] == 0:  # the checkpoint had reached train.steps already
        what = f"reused the finished training run (step {tr['step']}, checkpoint {os.path.abspath(tr['checkpoint'])})"
    else:
        what = (f"training {r['train_s']:.0f} s ({r['trained_steps']} steps to step {tr['step']}, final loss "
                f"{tr['loss']:.3f})")
    return (f"demo: {world} ranks, {what}, evaluation {r['eval_s']:.0f} s, total {total_s:.0f} s\n"
            f"demo: model (Hugging Face format) in {os.path.abspath(tr['hf_dir'])}; results in "
            f"{os.path.abspath(r['results_dir'])}")


def run_demo(cfg: DemoConfig) -> dict:
    from ..distributed.spawn import run_local

    from .train import validate

    if cfg.world < 1:
        raise ValueError(f"world={cfg.world} must be a positive number of ranks")
    # Bad settings fail here, in one line, not as a traceback from every rank it starts.
    cfg.model.validate()
    validate(TrainJobConfig(model=cfg.model, attention=cfg.attention, data=cfg.data, train=cfg.train), cfg.world)
    t0 = time.perf_counter()
    results = run_local(_worker, cfg.world, cfg, timeout=3600.0, threads=cfg.threads)
    r = results[0]
    print(summary(r, cfg.world, time.perf_counter() - t0), flush=True)
    return r


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--world", type=int, default=d.world, help="local CPU ranks (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="intra-op threads per rank (default %(default)s)")
    p.add_argument("--out-dir", default=d.out_dir, help="where results go (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.train.steps, help="training steps (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=d.data.seq_len, help="training length (default %(default)s)")
    p.add_argument("--algorithm", default=d.attention.algorithm, help="sequence-parallel attention (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    cfg = DemoConfig(world=args.world, threads=args.threads, out_dir=args.out_dir)
    cfg.train.steps = args.steps
    cfg.data.seq_len = args.seq_len
    cfg.attention.algorithm = args.algorithm
    run_demo(cfg)
    return 0
