"""The ``ringrt`` command line: ``ringrt <command> ...``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
this file only maps names to modules (imported lazily, so ``ringrt --help`` stays fast).

A bad setting is a ``ValueError`` raised by ringrt's own validation, naming the setting and the
valid values: each rank prints it as one line, ``ringrt <command>: error: <message>``, and exits
with 2 (as argparse does for a bad flag). Anything else keeps its full traceback, and so does a
``ValueError`` with ``RINGRT_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

from .run.errors import is_user_error, user_error

COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("ringrt.bench.cli", "benchmarks that print a table and write JSON (and PNG plots)"),
    "simulate": ("ringrt.simulate.cli", "cost model of the schedules: calibrate here, published anchors, GPU projection (simulation)"),
    "probe": ("ringrt.jobs.probe", "check a distributed launch: attention across all ranks vs a reference"),
    "train": ("ringrt.jobs.train", "train a Llama-family model on a sharded sequence (checkpoints, resume)"),
    "eval": ("ringrt.jobs.eval", "perplexity at several lengths (vanilla and Λ-mask) and passkey retrieval; table + PNG"),
    "generate": ("ringrt.jobs.generate", "sharded prefill of a long prompt, then decoding with a sharded KV cache"),
    "gpucheck": ("ringrt.gpucheck.cli", "GPU acceptance: every kernel vs references, a short demo, FLOP/s vs peak, schedules over NCCL"),
    "demo": ("ringrt.jobs.demo", "train short, evaluate long on 2 local CPU ranks: the Λ-mask keeps perplexity flat"),
    "cluster": ("ringrt.cluster", "a one-machine Slurm cluster to try the sbatch recipes (as root): up, down, status"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, plus a did-you-mean for a mistyped flag (``--train.stpes`` -> ``--train.steps``)."""

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = list(self._option_string_actions)
            hints = []
            for word in message[len(prefix):].split():
                near = difflib.get_close_matches(word.split("=")[0], flags, n=1) if word.startswith("--") else []
                if near:
                    hints.append(f"{word.split('=')[0]} -> {near[0]}")
            if hints:
                message += "; did you mean: " + ", ".join(hints) + "?"
        super().error(message)


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
    p = _Parser(prog=f"ringrt {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(p)
    args = p.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:  # jobs with something to resume say more (ringrt.jobs.interrupt)
        print(f"ringrt {argv[0]}: interrupted", file=sys.stderr, flush=True)
        return 130
    except ValueError as e:
        if not is_user_error(e):
            raise
        return user_error(f"ringrt {argv[0]}", e)


if __name__ == "__main__":
    sys.exit(main())
