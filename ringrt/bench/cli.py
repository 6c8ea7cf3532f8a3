"""``ringrt bench <name>``: dispatch to one benchmark module (``add_arguments`` / ``main``)."""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, tuple[str, str]] = {
    "attention": ("ringrt.bench.attention", "TokenRing fwd+bwd at W ranks vs one process with W threads"),
    "compare": ("ringrt.bench.compare", "every schedule and the outside peers side by side: time, efficiency, bytes, memory, roofline"),
    "compression": ("ringrt.bench.compression", "Extensible Tokenization: train the embedder, last-chunk perplexity, attention vs k"),
    "decode": ("ringrt.bench.decode", "decode tokens/s: the Λ-mask cache vs a full KV cache as the context grows"),
    "lambda": ("ringrt.bench.lambda_bench", "Λ-mask attention: time and bytes per rank as N and W grow, vs dense"),
    "scale": ("ringrt.bench.scale", "one sequence's fwd+bwd of the demo model: time, peak memory and bytes per rank as N grows"),
    "varlen": ("ringrt.bench.varlen", "packed documents (cu_seqlens) vs one padded row per document vs one call per document"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that benchmark")


def main(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.name][0])
    p = argparse.ArgumentParser(prog=f"ringrt bench {args.name}", description=BENCHES[args.name][1])
    module.add_arguments(p)
    return int(module.main(p.parse_args(args.rest)) or 0)
