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

Packed documents (``cu_seq_lens_q`` = ``cu_seq_lens_k``, the flash-attention varlen kwargs that
:func:`ringrt.hf.shard_inputs` returns for a packed batch and transformers forwards to the attention)
run ``ringrt.attention(..., cu_seqlens=)``: no token attends across a document boundary. Their
position ids must then be the per-document layout's (restarting at 0 in each document).

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
from ..ops.documents import Documents, lengths_of, lengths_problem
from ..ops.layout import positions as layout_positions
from .settings import NAME, SequenceParallel, has_sliding_layers, settings_of

_SINK_KWARGS = ("s_aux", "sinks")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention interface: query (B, H, S, D), key/value (B, H_kv, S, D) -> ((B, S, H, D), None)."""
    sp = settings_of(module)
    causal = bool(getattr(module, "is_causal", True))
    cu = kwargs.get("cu_seq_lens_q")
    problem = _config_problem(sp, module, query, key, causal, dropout, sliding_window, softcap, kwargs)
    if getattr(module, "layer_idx", None) in (0, None):  # once per forward: the data-dependent checks, agreed
        problem = problem or _data_problem(sp, query, attention_mask, kwargs.get("position_ids"), cu)
        base, rank, world = base_group(sp.group)
        checksum = Documents(lengths_of(cu), sp.layout, world).checksum() if cu is not None and not problem else 0
        fields = [("packed documents (cu_seq_lens_q given)", float(cu is not None)), ("cu_seq_lens_q (checksum)", float(checksum))]
        agree_fields(base, rank, world, problem, fields, "ringrt.hf attention", comm.resolve_timeout(sp.timeout), query.device)
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
    if cu is not None:  # packed documents: windows were refused above
        out = api.attention(q, k, v, causal=causal, algorithm=algorithm, layout=sp.layout, softmax_scale=scaling,
                            timeout=sp.timeout, group=sp.group, cu_seqlens=cu)
        return out, None
    out = api.attention(q, k, v, causal=causal, algorithm=algorithm, layout=sp.layout, softmax_scale=scaling,
                        timeout=sp.timeout, group=sp.group, window=window, inv_freq=inv_freq)
    return out, None


def _config_problem(sp: SequenceParallel, module, query, key, causal, dropout, sliding_window, softcap, kwargs) -> str | None:
    """Problems that depend only on the model and its settings (the same on every rank)."""
    if dropout:
        return f"attention dropout={dropout} is not supported (ringrt attention is exact); set config.attention_dropout=0.0"
    if softcap is not None:
        return f"softcap={softcap} (attention logit softcapping) is not supported"
    for name in _SINK_KWARGS:
        if kwargs.get(name) is not None:
            return f"{name} (attention sinks) is not supported"
    packed = _packed_problem(sp, module, query, sliding_window, kwargs)
    if packed:
        return packed
    if query.shape[2] != key.shape[2]:
        return (f"queries ({query.shape[2]}) and keys ({key.shape[2]}) differ in length: decoding with a KV cache is not "
                f"sequence-parallel; run the forward with use_cache=False")
    if sliding_window is not None and (not causal or sp.layout != "contiguous"):
        return (f"a sliding-window layer (sliding_window={sliding_window}) runs on contiguous shards, but layout={sp.layout!r}; "
                f"valid: 'contiguous' (ringrt.hf.patch picks it for models with sliding windows)")
    return None


def _packed_problem(sp: SequenceParallel, module, query, sliding_window, kwargs) -> str | None:
    """Problems of packed documents (the flash varlen kwargs) that every rank sees alike, or None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None:
        given, missing = ("cu_seq_lens_q", "cu_seq_lens_k") if cu_k is None else ("cu_seq_lens_k", "cu_seq_lens_q")
        return f"{given} is given but {missing} is not: packed documents need both, equal (ringrt.hf.shard_inputs returns both)"
    for name, cu in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
        problem = lengths_problem(cu)
        if problem:
            return f"{name}: {problem}"
    if cu_q.shape != cu_k.shape or not bool((cu_q.cpu() == cu_k.cpu()).all()):
        return ("cu_seq_lens_q != cu_seq_lens_k: queries and keys over different documents (cross-attention, a KV cache) are not "
                "supported; packed self-attention has cu_seq_lens_q == cu_seq_lens_k")
    config = getattr(module, "config", None)
    if sliding_window is not None or sp.lambda_mask is not None or (config is not None and has_sliding_layers(config)):
        what = ("a lambda_mask" if sp.lambda_mask is not None else
                f"sliding-window layers (sliding_window={sliding_window if sliding_window is not None else config.sliding_window})")
        return (f"packed documents (cu_seq_lens_q) cannot be used with {what}: ringrt attention takes no window with cu_seqlens; "
                f"valid: a model without sliding windows (e.g. Qwen2 use_sliding_window=False) and no lambda_mask, or unpacked batches")
    if query.shape[0] != 1:
        return (f"packed documents (cu_seq_lens_q) need a batch of one row, got batch size {query.shape[0]}: the boundaries describe "
                f"the one packed row (ringrt.hf.shard_inputs gives it)")
    return None


def _data_problem(sp: SequenceParallel, query, attention_mask, position_ids, cu=None) -> str | None:
    """Problems of this forward's inputs: a padding mask, position ids that are not this shard's."""
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            return f"a custom {attention_mask.dim()}-D attention_mask {tuple(attention_mask.shape)} is not supported (causal only)"
        pads = int((~attention_mask.bool()).sum())
        return (f"attention_mask pads {pads} token(s): ringrt attention takes no padding mask. Drop attention_mask; with padding "
                f"only at the end of each row, ringrt.hf.shard_inputs makes those tokens ignored labels (exact under causal attention)")
    _, rank, world = base_group(sp.group)
    if cu is not None:
        return _document_positions_problem(sp, query, position_ids, cu, rank, world)
    if world == 1:
        return None
    seq = query.shape[2]
    return _positions_problem(position_ids, layout_positions(sp.layout, rank, world, seq),
                              f"rank {rank}'s positions under layout={sp.layout!r} over {world} ranks",
                              "without them each shard is numbered from 0 and RoPE is silently wrong; a packed batch also passes "
                              "its cu_seq_lens_q/k")


def _document_positions_problem(sp: SequenceParallel, query, position_ids, cu, rank: int, world: int) -> str | None:
    docs = Documents(lengths_of(cu), sp.layout, world)
    seq = query.shape[2]
    if seq != docs.local_len:
        return (f"this rank holds {seq} tokens, but cu_seq_lens_q ({len(docs.lengths)} documents, {docs.total} tokens) cut for "
                f"layout={sp.layout!r} over {world} ranks gives every rank {docs.local_len}: cut the packed batch with "
                f"ringrt.hf.shard_inputs(batch, layout={sp.layout!r}) and pass its cu_seq_lens_q/k (global boundaries)")
    return _positions_problem(position_ids, docs.local_positions(rank),
                              f"rank {rank}'s in-document positions for cu_seq_lens_q under layout={sp.layout!r} over {world} ranks",
                              "positions restart at 0 in each document; otherwise RoPE is silently wrong")


def _positions_problem(position_ids: torch.Tensor | None, want: torch.Tensor, what: str, why: str) -> str | None:
    """Why ``position_ids`` (rows, S) are not ``want`` (S,) in every row (``what`` they should be), or None."""
    if position_ids is None:
        return "position_ids did not reach the attention; pass the shard's position_ids from ringrt.hf.shard_inputs"
    got = position_ids.reshape(-1, position_ids.shape[-1])
    if got.shape[-1] == want.shape[0] and bool((got.cpu() == want).all()):
        return None
    return (f"position_ids {_show(got[0])} are not {what} ({_show(want)}): pass position_ids=ringrt.hf.shard_inputs(...)"
            f"['position_ids'] ({why})")


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
