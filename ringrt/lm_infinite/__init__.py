"""LM-Infinite Λ-mask attention inside the ring: ``ringrt.lambda_attention`` and ``sliding_window_attention``.

Each query sees the first n_global tokens and the last n_local ones; shards are contiguous, so a
rank exchanges only a halo with a few predecessors plus the global tokens (a relay), skips every
empty block, and runs the rest with the block loops every schedule shares. Also the decode cache
that keeps only the tokens the mask can still see.

Read in this order: ``mask.py`` (the mask, block classification, additive masks; pure math),
``plan.py`` (Note [Λ-mask halo]: who sends what; pure integers), ``ring.py`` (forward/backward:
halo exchange, global relay, tiles), ``attention.py`` (public entry points, RoPE, input agreement),
``cache.py`` (decode cache), ``route.py`` (``ringrt.attention(..., window=...)`` inside the custom ops).

May import: ``ringrt.ops`` (kernels, merge, rope), ``ringrt.distributed`` (traffic, groups, input
agreement) and the shared pieces of ``ringrt.schedules`` (``base``: autograd Function and block
loops; ``blocks``: Block and the row slicer; ``call`` and ``routes``: the custom ops' settings and
their route table, which ``route.py`` fills). Never ``ringrt.simulate``, ``ringrt.bench``,
``ringrt.jobs`` or ``ringrt.model``.
"""

from . import route  # noqa: F401  registers the route of ``ringrt.attention(..., window=...)`` with the custom ops
from .attention import lambda_attention, sliding_window_attention
from .cache import LambdaKVCache
from .mask import LambdaMask, sliding_window

__all__ = ["LambdaKVCache", "LambdaMask", "lambda_attention", "sliding_window", "sliding_window_attention"]
