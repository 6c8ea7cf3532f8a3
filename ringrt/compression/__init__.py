"""Extensible Tokenization: a trainable embedder compresses long context k-fold for a frozen LLM.

Read in this order: ``select.py`` (down-scaling, choosing k), ``embedder.py``, ``packing.py``
(two-stream training, naive and packed), ``parallel.py`` (sequence-parallel inference),
``cache.py`` (offline), ``session.py`` (online), ``train.py`` / ``eval.py`` (the jobs behind
``ringrt train|eval --compression.enabled true``), ``config.py``.

May import: ``ringrt.data``, ``ringrt.model`` and what they may import (api, schedules,
lm_infinite, run, distributed, ops). Never ``ringrt.jobs`` (the jobs call in here, not the other
way round), engines or the tools. Enforced by ``tests/test_architecture.py``.
"""

from .cache import EmbeddingCache
from .config import CompressionConfig
from .embedder import ExtensibleEmbedder, encode_chunks, load_embedder, save_embedder
from .packing import naive_two_stream_loss, packed_two_stream_loss
from .select import choose_k, compressed_len, downscale, select_indices
from .session import CompressionSession

__all__ = ["CompressionConfig", "CompressionSession", "EmbeddingCache", "ExtensibleEmbedder", "choose_k", "compressed_len",
           "downscale", "encode_chunks", "load_embedder", "naive_two_stream_loss", "packed_two_stream_loss", "save_embedder",
           "select_indices"]
