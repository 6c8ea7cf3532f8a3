"""Tokenizers: bytes by default (no files, no downloads), or a local Hugging Face ``tokenizer.json``."""

from __future__ import annotations

import os
from typing import Protocol

from ..model.config import ModelConfig


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus <bos> = 256, <eos> = 257, <pad> = 258 (vocab 259)."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local ``tokenizer.json`` read with the ``tokenizers`` library."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(f"data.tokenizer={path!r}: no such file (expected a local tokenizer.json)")
        try:
            self._tok = _Tok.from_file(file)
        except Exception as e:  # tokenizers raises its own Exception type for a corrupt file
            raise ValueError(f"data.tokenizer={path!r} is not a readable tokenizer.json ({e})") from None
        self.name = file
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = next((self._tok.token_to_id(t) for t in ("<s>", "<|begin_of_text|>", "<bos>")
                            if self._tok.token_to_id(t) is not None), None)
        self.eos_id = next((self._tok.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
                            if self._tok.token_to_id(t) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(path: str | None) -> ByteTokenizer | HFTokenizer:
    """The byte tokenizer for None, else the ``tokenizer.json`` at ``path`` (a file or its directory)."""
    return ByteTokenizer() if path is None else HFTokenizer(path)


def check_tokenizer(tok, model: ModelConfig) -> None:
    """ValueError if the tokenizer can produce ids the model has no embedding for."""
    if tok.vocab_size > model.vocab_size:
        raise ValueError(
            f"tokenizer {tok.name!r} has {tok.vocab_size} tokens but the model's vocab_size is {model.vocab_size}: "
            f"they do not belong together (use the tokenizer the model was trained with, or data.tokenizer=null for bytes)"
        )
