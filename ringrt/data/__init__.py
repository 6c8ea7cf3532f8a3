"""Tokenizers, corpora and batching."""
