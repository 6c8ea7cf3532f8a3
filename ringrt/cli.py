"""The ``ringrt`` command line: ``ringrt <command> ...``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
this file only maps names to modules (imported lazily, so ``ringrt --help`` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("ringrt.bench.cli", "benchmarks that print a table and write JSON (and PNG plots)"),
    "simulate": ("ringrt.simulate.cli", "cost model of the schedules: calibrate here, published anchors, GPU projection (simulation)"),
    "probe": ("ringrt.probe", "check a distributed launch: attention across all ranks vs a reference"),
    "train": ("ringrt.jobs.train", "train a Llama-family model on a sharded sequence (checkpoints, resume)"),
    "eval": ("ringrt.jobs.eval", "perplexity at several lengths (vanilla and Λ-mask) and passkey retrieval; table + PNG"),
    "generate": ("ringrt.jobs.generate", "sharded prefill of a long prompt, then decoding with a sharded KV cache"),
    "gpucheck": ("ringrt.gpucheck.cli", "GPU acceptance: every kernel vs references, a short demo, FLOP/s vs peak, schedules over NCCL"),
    "demo": ("ringrt.jobs.demo", "train short, evaluate long on 2 local CPU ranks: the Λ-mask keeps perplexity flat"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ringrt", description="Sequence-parallel long-context runtime")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv[:1])
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    p = argparse.ArgumentParser(prog=f"ringrt {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(p)
    try:
        return int(module.main(p.parse_args(argv[1:])) or 0)
    except KeyboardInterrupt:  # jobs with something to resume say more (ringrt.jobs.interrupt)
        print(f"ringrt {argv[0]}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
