"""Packed documents: training rows that keep document boundaries (``data.pack_documents=true``).

Note [packed rows]
------------------
Documents (each text of ``corpus.documents``, tokenised and <eos>-terminated as in the plain
stream) are laid end to end into rows of ``length = seq_len + 1`` tokens, as the plain windows are
(``batching.sequences``): the model reads tokens [0, S) of a row and predicts [1, S + 1). What is
new is that every row knows its *segments*: the runs of tokens that come from one document.

* A document that does not fit in what is left of a row is cut there and continues at the start of
  the next row as a segment of its own (nothing is dropped; its positions restart at 0 there).
* With <bos> (``data.add_bos`` and a tokenizer that has one) every segment starts with <bos>, the
  continuation of a cut document too: each attention span has its sink at position 0, as every
  plain window has. When only the <bos> of the next segment would fit in a row, it fills the row's
  last slot and the document starts (with another <bos>) in the next row.
* The label of input i is token i + 1 when both are in the same segment, else -100 (ignored): the
  <eos> of one document never predicts the first token of the next, and padding added later
  (``ringrt.shard`` with ``cu_seqlens``) is ignored the same way.
* ``cu_seqlens`` of a row covers its S inputs: the running sums of its segments' lengths, the last
  segment without the row's target-only token S (a segment that is only that token holds no input).

Rows come in the order of the plain windows, so batches are a function of (seed, epoch) alone and
resume by skipping, as ``batching.train_batches`` does for both kinds.

    length 8, <bos> = B, documents "abc" and "defghijk" (E = <eos>):
    row 0: B a b c E B d e      segments [5, 3]   inputs B a b c E B d   cu [0, 5, 7]
                                labels    a b c E - d e                  ('-' = -100)
    row 1: B f g h i j k E      segments [8]      cu [0, 7]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .corpus import documents

IGNORE = -100
"""The label of an input whose next token is in another segment (cross-entropy's ignore_index)."""


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """A batch of packed rows (Note [packed rows]).

    ``tokens`` (B, S + 1) int64 as a plain batch; ``labels`` (B, S) int64, ``tokens[:, 1:]`` with -100
    where the target is in another segment; ``cu_seqlens`` one (n_b + 1,) int64 tensor per row, the
    segment boundaries of its S inputs."""

    tokens: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: tuple[torch.Tensor, ...]

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The B rows as one packed sequence, as flash-attn's varlen users feed them: input_ids (1, B S),
        labels (1, B S) and cu_seqlens (int64, over the B S inputs: every row's segments in row order).
        What ``ringrt.model.parallel.shard_batch`` reads."""
        b, s = self.labels.shape
        ids = self.tokens[:, :-1].reshape(1, b * s)
        labels = self.labels.reshape(1, b * s)
        cu = torch.cat([torch.zeros(1, dtype=torch.int64)] + [c[1:] + i * s for i, c in enumerate(self.cu_seqlens)])
        return ids, labels, cu


def pack_rows(docs: Iterable[list[int]], length: int, bos: int | None = None) -> Iterator[tuple[list[int], list[int]]]:
    """(tokens, segment lengths) of consecutive rows of ``length`` tokens packed from ``docs`` (token
    lists); the segments tile the row, target-only last token included. A last, partial row is dropped."""
    head = [] if bos is None else [bos]
    row: list[int] = []
    segs: list[int] = []
    for doc in docs:
        i = 0
        while i < len(doc):
            take = doc[i : i + length - len(row) - len(head)]  # may be empty: only the <bos> fits
            row += head + take
            segs.append(len(head) + len(take))
            i += len(take)
            if len(row) == length:
                yield row, segs
                row, segs = [], []


def row_tensors(tokens: list[int], segs: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (S + 1,), labels (S,), cu_seqlens (n + 1,)) int64 of one packed row."""
    t = torch.tensor(tokens, dtype=torch.int64)
    seg_id = torch.repeat_interleave(torch.arange(len(segs)), torch.tensor(segs))  # (S + 1,)
    labels = torch.where(seg_id[1:] == seg_id[:-1], t[1:], IGNORE)
    ends = torch.tensor(segs, dtype=torch.int64).cumsum(0).clamp_max(len(tokens) - 1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), ends]).unique_consecutive()  # a target-only last segment: no inputs
    return t, labels, cu


def packed_rows(files: list[Path], tok, length: int, jsonl_field: str = "text", bos: int | None = None) -> Iterator[tuple]:
    """:func:`row_tensors` of the rows packed from the documents of ``files`` (in that order)."""
    eos = [] if tok.eos_id is None else [tok.eos_id]
    docs = (tok.encode(text) + eos for text in documents(files, jsonl_field))
    for tokens, segs in pack_rows(docs, length, bos):
        yield row_tensors(tokens, segs)


def stack_rows(rows: list[tuple]) -> PackedBatch:
    """The :class:`PackedBatch` of ``rows`` (each from :func:`row_tensors`)."""
    return PackedBatch(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), tuple(r[2] for r in rows))
