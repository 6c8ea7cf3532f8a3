"""The transformers attention backend: ``attn_implementation="ringrt"``.

transformers calls ``attention_forward(module, query, key, value, attention_mask, scaling=...,
dropout=..., sliding_window=..., **kwargs)`` with q/k/v heads-first (B, H, S_local, D), q and k
already rotated. It runs ``ringrt.attention`` on this rank's shard and returns (B, S_local, H, D).

Two mistakes would silently corrupt training, so both are refused:

* a padding mask: transformers hands a custom backend no mask at all, so padding would be attended.
  ringrt registers its own mask function: it passes a mask through only when it pads something,
  and the backend refuses it (right padding is exact under causal attention without a mask:
  :func:`ringrt.hf.shard_inputs` turns it into ignored labels);
* position ids that are not this shard's: a model given none numbers every shard from 0, so RoPE
  rotates each shard as if it began the sequence. The backend checks the ids the model used against
  the layout's positions of this rank.

Such data-dependent problems are agreed on at the first layer of every forward (one small
all_gather), so every rank raises the same ValueError before any attention traffic; problems
that depend only on the config (a window on zigzag shards, softcapping, dropout) are the same on
every rank and raise at the layer that has them.
"""

from __future__ import annotations

import torch

from .. import api
from ..distributed import comm
from ..distributed.agree import agree_fields
from ..distributed.groups import base_group
from ..ops.layout import positions as layout_positions
from .settings import NAME, SequenceParallel, settings_of

_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_SINK_KWARGS = ("s_aux", "sinks")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention interface: query (B, H, S, D), key/value (B, H_kv, S, D) -> ((B, S, H, D), None)."""
    sp = settings_of(module)
    causal = bool(getattr(module, "is_causal", True))
    problem = _config_problem(sp, query, key, causal, dropout, sliding_window, softcap, kwargs)
    if getattr(module, "layer_idx", None) in (0, None):  # once per forward: the data-dependent checks, agreed
        problem = problem or _data_problem(sp, query, attention_mask, kwargs.get("position_ids"))
        base, rank, world = base_group(sp.group)
        agree_fields(base, rank, world, problem, [], "ringrt.hf attention", comm.resolve_timeout(sp.timeout), query.device)
    elif problem:
        raise ValueError(f"ringrt.hf attention: {problem}")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, S, H, D)
    window, inv_freq = None, None
    if sliding_window is not None:
        window = int(sliding_window)
    elif sp.lambda_mask is not None and causal:
        window = sp.lambda_mask
        inv_freq = sp.rotary.inv_freq if sp.rotary is not None else None
    algorithm = sp.algorithm
    if window is not None and algorithm != "tokenring":
        algorithm = "ring"  # the Λ ring's other way: halo K/V travel
    out = api.attention(q, k, v, causal=causal, algorithm=algorithm, layout=sp.layout, softmax_scale=scaling,
                        timeout=sp.timeout, group=sp.group, window=window, inv_freq=inv_freq)
    return out, None


def _config_problem(sp: SequenceParallel, query, key, causal, dropout, sliding_window, softcap, kwargs) -> str | None:
    """Problems that depend only on the model and its settings (the same on every rank)."""
    if dropout:
        return f"attention dropout={dropout} is not supported (ringrt attention is exact); set config.attention_dropout=0.0"
    if softcap is not None:
        return f"softcap={softcap} (attention logit softcapping) is not supported"
    for name in _SINK_KWARGS:
        if kwargs.get(name) is not None:
            return f"{name} (attention sinks) is not supported"
    for name in _PACKED_KWARGS:
        if kwargs.get(name) is not None:
            return f"{name}: packed sequences (flash-attention varlen kwargs) are not supported"
    if query.shape[2] != key.shape[2]:
        return (f"queries ({query.shape[2]}) and keys ({key.shape[2]}) differ in length: decoding with a KV cache is not "
                f"sequence-parallel; run the forward with use_cache=False")
    if sliding_window is not None and (not causal or sp.layout != "contiguous"):
        return (f"a sliding-window layer (sliding_window={sliding_window}) runs on contiguous shards, but layout={sp.layout!r}; "
                f"valid: 'contiguous' (ringrt.hf.patch picks it for models with sliding windows)")
    return None


def _data_problem(sp: SequenceParallel, query, attention_mask, position_ids) -> str | None:
    """Problems of this forward's inputs: a padding mask, position ids that are not this shard's."""
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            return f"a custom {attention_mask.dim()}-D attention_mask {tuple(attention_mask.shape)} is not supported (causal only)"
        pads = int((~attention_mask.bool()).sum())
        return (f"attention_mask pads {pads} token(s): ringrt attention takes no padding mask. Drop attention_mask; with padding "
                f"only at the end of each row, ringrt.hf.shard_inputs makes those tokens ignored labels (exact under causal attention)")
    _, rank, world = base_group(sp.group)
    if world == 1:
        return None
    seq = query.shape[2]
    want = layout_positions(sp.layout, rank, world, seq)
    if position_ids is None:
        return "position_ids did not reach the attention; pass the shard's position_ids from ringrt.hf.shard_inputs"
    got = position_ids.reshape(-1, position_ids.shape[-1])
    if got.shape[-1] != seq or not bool((got.cpu() == want).all()):
        return (f"position_ids {_show(got[0])} are not rank {rank}'s positions under layout={sp.layout!r} over {world} ranks "
                f"({_show(want)}): pass position_ids=ringrt.hf.shard_inputs(...)['position_ids'] (without them each shard is "
                f"numbered from 0 and RoPE is silently wrong)")
    return None


def _show(x: torch.Tensor) -> str:
    vals = x.tolist()
    return str(vals) if len(vals) <= 6 else f"[{', '.join(map(str, vals[:3]))}, ..., {', '.join(map(str, vals[-2:]))}]"


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0, mask_function=None,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """transformers' mask interface for ``"ringrt"``: the 2-D mask when it pads anything (for the
    backend to refuse), else None (causal attention needs no mask)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


def register() -> None:
    """Register ``"ringrt"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)
