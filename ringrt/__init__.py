"""ringrt: a sequence-parallel long-context runtime for PyTorch.

Read first: ``api.py`` (public entry points), ``schedule.py`` (Note [TokenRing]),
``tokenring.py`` (the ring pass, forward and backward), ``comm.py`` (all point-to-point traffic).
"""

from .api import ALGORITHMS, attention, shard, unshard
from .comm import CommTimeout
from .layout import pad_to_multiple, positions

__all__ = ["ALGORITHMS", "CommTimeout", "attention", "pad_to_multiple", "positions", "shard", "unshard"]
__version__ = "0.1.0"
