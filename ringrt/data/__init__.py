"""Tokenizers, corpora and batching: where the tokens of a job come from.

Read first: ``batching.py`` (documents -> windows of ``seq_len + 1`` tokens, in an order that
resumes exactly), ``packing.py`` (whole documents packed into rows that keep their
boundaries, ``data.pack_documents``), ``corpus.py`` (files, globs, JSONL; by default the Python standard library's
source), ``tokenizer.py`` (byte-level or a Hugging Face ``tokenizer.json``), ``config.py``.

May import: ``ringrt.model`` (a tokenizer is checked against the model's vocabulary) and what it
may import. Never compression, jobs, engines or the tools.
"""
