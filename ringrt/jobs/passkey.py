"""Passkey retrieval prompts (LM-Infinite / Landmark Attention style): a number hidden at a given
depth of long filler text, followed by a question; the model must continue with the number."""

from __future__ import annotations

import random

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is "


def key_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_example(tok, length: int, depth: float, rng: random.Random, digits: int = 5) -> tuple[torch.Tensor, int]:
    """(tokens (length + 1,), n_answer): filler with the key line at ``depth`` in [0, 1], the
    question, then the answer digits as the last ``n_answer`` tokens. The model reads
    tokens[:-1]; the answer is right iff its argmax at each answer position is the next digit
    (the same criterion as greedy decoding of the digits)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth={depth} must be in [0, 1]")
    key = str(rng.randrange(10 ** (digits - 1), 10**digits))
    line, question, answer = tok.encode(key_line(key)), tok.encode(QUESTION), tok.encode(key)
    n_fill = length + 1 - len(line) - len(question) - len(answer)
    if n_fill < 0:
        raise ValueError(f"passkey length={length} is too short for the prompt ({length + 1 - n_fill} tokens needed)")
    unit = tok.encode(FILLER)
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    cut = int(round(depth * n_fill))
    ids = filler[:cut] + line + filler[cut:] + question + answer
    return torch.tensor(ids, dtype=torch.int64), len(answer)
