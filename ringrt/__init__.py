"""ringrt: a sequence-parallel long-context runtime for PyTorch.

Read first: ``api.py`` (public entry points), ``schedules/tokenring_plan.py`` (Note [TokenRing]:
who sends what at each step), ``schedules/tokenring.py`` (the ring pass, forward and backward),
``distributed/comm.py`` (all point-to-point traffic). The package layout and its import rules are in
the README ("Read these files first") and ``tests/test_architecture.py``.

``import ringrt`` loads the attention runtime only (torch, no Hugging Face, Hydra or plotting
libraries): :func:`load_pretrained` / :func:`save_pretrained` (safetensors) and the loss and
gradient helpers over a sharded sequence (:func:`sequence_loss`, :func:`sum_gradients`) load on
first use. ``import ringrt.hf`` makes ringrt a transformers attention backend (any HF decoder,
sequence-parallel).
"""

from .api import ALGORITHMS, attention, positions, shard, unshard
from .distributed.comm import CommError, CommTimeout
from .lm_infinite import LambdaKVCache, LambdaMask, lambda_attention, sliding_window, sliding_window_attention
from .ops.documents import cu_seqlens_from_positions, document_positions
from .ops.layout import pad_to_multiple

_LAZY = {"load_pretrained": "model.hf", "save_pretrained": "model.hf", "sequence_loss": "model.parallel", "sum_gradients": "model.parallel"}
"""Public names imported on first use (``ringrt.load_pretrained``), and their modules."""


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'ringrt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ALGORITHMS", "CommError", "CommTimeout", "cu_seqlens_from_positions", "document_positions", "LambdaKVCache", "LambdaMask", "attention", "lambda_attention", "load_pretrained", "pad_to_multiple", "positions", "save_pretrained", "sequence_loss", "shard", "sliding_window", "sliding_window_attention", "sum_gradients", "unshard"]
__version__ = "0.1.0"
