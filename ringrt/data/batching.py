"""Token sequences and batches. Documents are tokenised, joined with <eos> and cut into windows
of ``seq_len + 1`` tokens (inputs and next-token targets). The order is a function of
(seed, epoch) alone, so a run resumes exactly by skipping the batches it already consumed.
With ``data.pack_documents`` the rows keep their document boundaries (``packing.py``)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import torch

from .config import DataConfig
from .corpus import documents, resolve, split
from .packing import PackedBatch, packed_rows, stack_rows


def token_stream(files: list[Path], tok, jsonl_field: str = "text") -> Iterator[int]:
    for text in documents(files, jsonl_field):
        yield from tok.encode(text)
        if tok.eos_id is not None:
            yield tok.eos_id


def sequences(files: list[Path], tok, length: int, jsonl_field: str = "text", bos: int | None = None) -> Iterator[torch.Tensor]:
    """Consecutive windows of ``length`` tokens (int64) over the stream of ``files``; with ``bos``,
    each window starts with that token (then ``length - 1`` tokens of the stream)."""
    start = [] if bos is None else [bos]
    buf: list[int] = list(start)
    for t in token_stream(files, tok, jsonl_field):
        buf.append(t)
        if len(buf) == length:
            yield torch.tensor(buf, dtype=torch.int64)
            buf = list(start)


def _bos(cfg: DataConfig, tok) -> int | None:
    return getattr(tok, "bos_id", None) if cfg.add_bos else None


def train_files(cfg: DataConfig) -> list[Path]:
    return split(resolve(cfg.paths), cfg.val_percent)[0]


def val_files(cfg: DataConfig) -> list[Path]:
    return split(resolve(cfg.paths), cfg.val_percent)[1]


def train_batches(cfg: DataConfig, tok, *, replicas: int = 1, replica: int = 0, skip: int = 0) -> Iterator[torch.Tensor | PackedBatch]:
    """Endless (batch_size, seq_len + 1) batches for data-parallel ``replica`` of ``replicas``;
    with ``cfg.pack_documents`` :class:`~ringrt.data.packing.PackedBatch` es of as many rows, which
    also carry each row's labels and document boundaries (Note [packed rows]).

    Epoch e visits the training files in the order of ``random.Random(seed + e)``; each global
    batch of ``replicas * batch_size`` sequences is split between replicas. ``skip`` global batches
    are dropped first (resume).
    """
    files = train_files(cfg)
    per = cfg.batch_size
    epoch, seen = 0, 0
    while True:
        order = list(files)
        random.Random(cfg.seed + epoch).shuffle(order)
        if cfg.pack_documents:
            rows = packed_rows(order, tok, cfg.seq_len + 1, cfg.jsonl_field, _bos(cfg, tok))
        else:
            rows = sequences(order, tok, cfg.seq_len + 1, cfg.jsonl_field, _bos(cfg, tok))
        group: list = []
        produced = False
        for seq in rows:
            group.append(seq)
            if len(group) == replicas * per:
                produced = True
                if seen >= skip:
                    mine = group[replica * per : (replica + 1) * per]
                    yield stack_rows(mine) if cfg.pack_documents else torch.stack(mine)
                seen += 1
                group = []
        if not produced:
            raise ValueError(f"the training text holds fewer than {replicas * per} sequences of {cfg.seq_len + 1} tokens; "
                             f"add data (data.paths) or lower data.seq_len / data.batch_size")
        epoch += 1


def eval_sequences(cfg: DataConfig, tok, length: int, count: int) -> torch.Tensor:
    """The first ``count`` windows of ``length + 1`` validation tokens, (count, length + 1)."""
    out = []
    for seq in sequences(val_files(cfg), tok, length + 1, cfg.jsonl_field, _bos(cfg, tok)):
        out.append(seq)
        if len(out) == count:
            return torch.stack(out)
    if not out:
        raise ValueError(f"the validation text holds no sequence of {length + 1} tokens; add data or lower the eval length")
    return torch.stack(out)
