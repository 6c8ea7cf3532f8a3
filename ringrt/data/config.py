"""Config of the text data: where it comes from, how it is tokenised and cut into sequences."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Text files, directories or globs (``*.txt``, ``**/*.py``, ``*.jsonl``). Empty = the Python
    standard library's source (present on every machine; no download)."""
    jsonl_field: str = "text"
    """Field holding the text in ``.jsonl`` files."""
    tokenizer: str | None = None
    """A local Hugging Face ``tokenizer.json``; None = the byte-level tokenizer (vocab 259)."""
    seq_len: int = 256
    """Tokens per training sequence (the model sees ``seq_len`` inputs and predicts ``seq_len`` targets)."""
    batch_size: int = 8
    """Sequences per micro-batch on each data-parallel replica."""
    val_percent: float = 2.0
    """Percentage of documents kept for validation (chosen by a hash of the path, so deterministic)."""
    add_bos: bool = True
    """Start every sequence with the tokenizer's <bos> token (when it has one), as LLMs are trained;
    it becomes the "attention sink" that the Λ-mask's global branch keeps in view."""
    seed: int = 0
    """Seeds the document order of each epoch."""
    pack_documents: bool = False
    """Training batches keep document boundaries (``ringrt/data/packing.py``): whole documents packed
    into rows of ``seq_len + 1`` tokens, attention and RoPE positions restarting at every document, no
    target crossing from one document into the next (a document cut at a row's end continues in the
    next row as a document of its own, with its own <bos>). False: windows of the token stream, each
    attending across the documents it holds. Training only (eval scores windows either way); not with
    the Λ-mask or compression."""

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be at least 2")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size} must be a positive integer")
        if not 0.0 < self.val_percent < 100.0:
            raise ValueError(f"data.val_percent={self.val_percent} must be in (0, 100)")
