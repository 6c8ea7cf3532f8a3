"""ringrt: a sequence-parallel long-context runtime for PyTorch.

Read first: ``api.py`` (public entry points), ``schedule.py`` (Note [TokenRing]),
``tokenring.py`` (the ring pass, forward and backward), ``comm.py`` (all point-to-point traffic).
"""

from .api import ALGORITHMS, attention, shard, unshard
from .distributed.comm import CommError, CommTimeout
from .lm_infinite import LambdaKVCache, LambdaMask, lambda_attention, sliding_window, sliding_window_attention
from .ops.layout import pad_to_multiple, positions
from .model.hf import load_pretrained, save_pretrained

__all__ = ["ALGORITHMS", "CommError", "CommTimeout", "LambdaKVCache", "LambdaMask", "attention", "lambda_attention", "load_pretrained", "pad_to_multiple", "positions", "save_pretrained", "shard", "sliding_window", "sliding_window_attention", "unshard"]
__version__ = "0.1.0"
