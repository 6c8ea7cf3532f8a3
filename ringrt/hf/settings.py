"""How a Hugging Face model runs sequence-parallel: :class:`SequenceParallel` and :func:`patch`."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..api import ALGORITHMS
from ..lm_infinite import LambdaMask
from ..ops.layout import LAYOUTS

NAME = "ringrt"
"""The ``attn_implementation`` name ringrt registers with transformers."""


@dataclass(frozen=True, kw_only=True)
class SequenceParallel:
    """The settings every attention call of a patched model runs with."""

    algorithm: str = "tokenring"
    """One of ``ringrt.ALGORITHMS``; sliding-window and Λ-mask layers run on the Λ ring: ``"tokenring"``
    there too, any other value the ``"ring"`` way (halo K/V travel)."""
    layout: str = "zigzag"
    """How the sequence is sharded (``ringrt.hf.shard_inputs`` must use the same); ``"contiguous"``
    when the model has sliding-window layers or a ``lambda_mask`` is set."""
    group: Any = None
    """Process group (or 1-D DeviceMesh) the sequence is sharded over; None: the default group."""
    lambda_mask: LambdaMask | None = None
    """LM-Infinite's Λ-mask on every full-attention layer (sliding-window layers keep their window)."""
    timeout: float | None = None
    """Seconds a transfer may wait for a peer (``ringrt.attention``'s ``timeout``)."""
    rotary: Any = None
    """The model's rotary embedding module (its ``inv_freq``), read by a Λ-mask's global branch."""


_SETTINGS: "weakref.WeakKeyDictionary[torch.nn.Module, SequenceParallel]" = weakref.WeakKeyDictionary()


def has_sliding_layers(config) -> bool:
    """Whether any layer of this transformers config uses a sliding window (Mistral's
    ``sliding_window``; Qwen2's and others' ``layer_types`` with ``"sliding_attention"``)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return "sliding_attention" in types and getattr(config, "sliding_window", None) is not None
    return getattr(config, "sliding_window", None) is not None


def patch(model: torch.nn.Module, *, algorithm: str = "tokenring", layout: str | None = None, group=None,
          lambda_mask: LambdaMask | None = None, timeout: float | None = None) -> SequenceParallel:
    """Run every attention layer of a transformers model through ringrt, sequence-parallel over ``group``.

    Sets the model's ``attn_implementation`` to ``"ringrt"`` and records the settings for its
    modules. Call it on every rank with the same arguments, then feed each rank its shard
    (:func:`ringrt.hf.shard_inputs` with ``layout=settings.layout``). Returns the settings.

    ``layout`` defaults to ``"zigzag"`` (balanced causal work), or ``"contiguous"`` when the model has
    sliding-window layers or ``lambda_mask`` is given (both run on contiguous shards).

    Raises ValueError (naming the setting, its value and the valid ones) for an unknown algorithm or
    layout, a zigzag layout on a model with windows, an invalid ``lambda_mask``, or a Λ-mask on a
    model whose RoPE is not found or scales its cos/sin (``attention_scaling != 1``).
    """
    config = model.config
    windows = has_sliding_layers(config) or lambda_mask is not None
    layout = layout if layout is not None else ("contiguous" if windows else "zigzag")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is not a known algorithm; valid: {', '.join(ALGORITHMS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a known layout; valid: {', '.join(LAYOUTS)}")
    if windows and layout != "contiguous":
        why = "lambda_mask is set" if lambda_mask is not None else f"the model has sliding-window layers (sliding_window={config.sliding_window})"
        raise ValueError(f"layout={layout!r} cannot be used: {why}, and windowed attention runs on contiguous shards; valid: 'contiguous'")
    rotary = None
    if lambda_mask is not None:
        if not isinstance(lambda_mask, LambdaMask) or lambda_mask.problem():
            raise ValueError(f"lambda_mask={lambda_mask!r}: {lambda_mask.problem() if isinstance(lambda_mask, LambdaMask) else 'must be a ringrt.LambdaMask'}")
        rotary = _rotary_of(model) if lambda_mask.n_global else None
    model.set_attn_implementation(NAME)  # registered by ``import ringrt.hf``
    sp = SequenceParallel(algorithm=algorithm, layout=layout, group=group, lambda_mask=lambda_mask, timeout=timeout, rotary=rotary)
    for m in model.modules():
        _SETTINGS[m] = sp
    return sp


def settings_of(module: torch.nn.Module) -> SequenceParallel:
    """The settings a module of a patched model runs with; for a model loaded with
    ``attn_implementation="ringrt"`` and never patched, the defaults for its config."""
    sp = _SETTINGS.get(module)
    if sp is None:  # remembered per module, like a patch's settings (a config's id could be reused)
        config = getattr(module, "config", None)
        sp = _SETTINGS[module] = SequenceParallel(layout="contiguous" if config is not None and has_sliding_layers(config) else "zigzag")
    return sp


def _rotary_of(model: torch.nn.Module):
    """The model's one rotary embedding module (it holds ``inv_freq``); ValueError if none, several
    distinct ones, or one that scales cos/sin (the Λ-mask's re-rotation assumes a pure rotation)."""
    found = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if len(found) != 1:
        raise ValueError(f"lambda_mask with n_global > 0 needs the model's rotary embedding (one module with an inv_freq buffer); "
                         f"found {len(found)}. Use n_global=0 (a plain sliding window) for this model")
    scaling = getattr(found[0], "attention_scaling", 1.0)
    if not math.isclose(float(scaling), 1.0):
        raise ValueError(f"lambda_mask with n_global > 0 cannot be used with a RoPE that scales cos/sin (attention_scaling={scaling}); "
                         f"valid: rope types without attention scaling (default, linear, llama3, dynamic), or n_global=0")
    return found[0]
