"""Tokenizers, corpora and batching: determinism, splits, JSONL, resume by skipping, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from ringrt.data.batching import eval_sequences, sequences, train_batches
from ringrt.data.config import DataConfig
from ringrt.data.corpus import resolve, split, stdlib_files
from ringrt.data.tokenizer import ByteTokenizer, HFTokenizer, check_tokenizer, load_tokenizer
from ringrt.model.config import ModelConfig


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'Λ-mask ✓'\n"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256 and tok.vocab_size == 259


def test_stdlib_corpus_is_real_sorted_and_split_deterministically():
    files = stdlib_files()
    assert len(files) > 500 and files == sorted(files)
    assert any(f.name == "os.py" for f in files)
    train, val = split(files, 2.0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(files)
    assert 0.005 < len(val) / len(files) < 0.05
    assert split(files, 2.0) == (train, val)


def test_files_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 10}) for i in range(5)) + "\n")
    files = resolve([str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")])
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    seqs = list(sequences(files, ByteTokenizer(), 17))
    total = 240 + 1 + sum(len(f"doc {i} " * 10) + 1 for i in range(5))  # + one <eos> per document
    assert len(seqs) == total // 17 and all(s.shape == (17,) for s in seqs)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="jsonl_field"):
        list(sequences(resolve([str(tmp_path / "bad.jsonl")]), ByteTokenizer(), 4))
    with pytest.raises(ValueError, match="matches no file"):
        resolve([str(tmp_path / "*.md")])


def test_batches_are_deterministic_split_between_replicas_and_resume_by_skipping():
    cfg = DataConfig(seq_len=64, batch_size=2)
    tok = ByteTokenizer()
    full = train_batches(cfg, tok)
    first = [next(full) for _ in range(5)]
    resumed = train_batches(cfg, tok, skip=3)
    assert torch.equal(next(resumed), first[3]) and torch.equal(next(resumed), first[4])
    r0, r1 = train_batches(cfg, tok, replicas=2, replica=0), train_batches(cfg, tok, replicas=2, replica=1)
    a, b = next(r0), next(r1)
    assert torch.equal(torch.cat([a, b]), torch.cat(first[:2]))  # replicas split one global batch
    assert a.shape == (2, 65)
    ev = eval_sequences(cfg, tok, 128, 3)
    assert ev.shape == (3, 129) and torch.equal(ev, eval_sequences(cfg, tok, 128, 3))


def test_tokenizer_json_and_vocab_mismatch(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(300)} | {"[UNK]": 300, "</s>": 301}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 302 and tok.eos_id == 301
    assert tok.encode("w5 w7 zz") == [5, 7, 300]
    with pytest.raises(ValueError, match="302 tokens but the model's vocab_size is 259"):
        check_tokenizer(tok, ModelConfig())
    check_tokenizer(tok, ModelConfig(vocab_size=302))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_tokenizer(str(tmp_path / "broken.json"))
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))
