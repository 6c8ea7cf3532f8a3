"""LM-Infinite Λ-mask attention inside the ring (contiguous shards, halo exchange, block skipping).

Read ``mask.py`` (the mask, block classification), ``plan.py`` (Note [Λ-mask halo]: who sends what),
``ring.py`` (forward/backward), ``attention.py`` (public entry points), ``cache.py`` (decode cache).
"""

from .attention import lambda_attention, sliding_window_attention
from .cache import LambdaKVCache
from .mask import LambdaMask, sliding_window

__all__ = ["LambdaKVCache", "LambdaMask", "lambda_attention", "sliding_window", "sliding_window_attention"]
