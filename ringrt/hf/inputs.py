"""This rank's shard of a Hugging Face batch: :func:`shard_inputs`."""

from __future__ import annotations

from typing import Mapping

import torch

from ..distributed.groups import base_group
from ..ops.documents import Documents, cu_seqlens_from_positions, document_positions, lengths_of, lengths_problem, shard_documents
from ..ops.layout import check_layout, num_chunks, pad_to_multiple, positions as layout_positions, shard_of

IGNORE = -100


def shard_inputs(batch: Mapping[str, torch.Tensor], *, layout: str = "zigzag", group=None, pad_token_id: int = 0,
                 cu_seqlens: torch.Tensor | None = None) -> dict:
    """This rank's shard of a causal-LM batch that every rank of ``group`` holds in full.

    Args:
        batch: ``input_ids`` (B, S); optional ``labels`` (B, S), Hugging Face's unshifted labels
            (default: the input ids), -100 = not scored; optional ``attention_mask`` (B, S), allowed
            only as right padding (each row ones, then zeros): padded tokens become ignored labels,
            which is exact under causal attention (no real token sees a later one).
        layout: the sharding the model was patched with (``ringrt.hf.patch(...).layout``).
        group: process group or 1-D DeviceMesh the sequence is sharded over (default: the default group).
        pad_token_id: token appended when S is not a multiple of the layout's chunk count
            (W contiguous, 2W zigzag); appended tokens are ignored labels, so the loss is unchanged.
        cu_seqlens: packed documents (see "Packed documents" below): a 1-D integer tensor
            ``[0, L_0, L_0 + L_1, ..., S]`` of document boundaries in the batch's one row.

    Returns:
        dict with ``input_ids`` (B, S_local), ``position_ids`` (B, S_local) (the true positions of
        this shard's tokens: pass them, the model would otherwise number every shard from 0),
        ``shift_labels`` (B, S_local) (token t's target is token t + 1, shifted before sharding so no
        label crosses a shard boundary), ``labels`` (the same tensor, so that the model computes its
        loss with ``shift_labels``) and ``num_items_in_batch`` (scored tokens of the whole batch, the
        same on every rank). ``model(**inputs, use_cache=False).loss`` is then this rank's share: its
        tokens' summed cross-entropy over ``num_items_in_batch``; the shares add up to the full
        loss, and summing gradients over the group (:func:`ringrt.hf.sum_gradients`) gives the full
        gradient.

    Packed documents: a batch of one row (1, S) holding several documents, marked either by
    ``cu_seqlens=``, by ``batch['cu_seq_lens_q']``, or by ``batch['position_ids']`` (1, S) that
    restart at 0 in each document (``transformers.DataCollatorWithFlattening`` gives the latter two). No token attends across a document boundary. Each document is cut
    on its own (``ringrt.shard(..., cu_seqlens=)``: padded at its end to a multiple of the chunk
    count, rank r holding its chunks r and 2W-1-r); ``position_ids`` restart at 0 in each document;
    labels are shifted within each document (a document's last token predicts nothing); and the
    dict also holds ``cu_seq_lens_q`` = ``cu_seq_lens_k`` (int32: the GLOBAL boundaries of the whole
    packed row, the same on every rank) and ``max_length_q`` = ``max_length_k`` (the longest
    document), the keyword arguments transformers forwards to the attention function, where
    ringrt's backend runs ``ringrt.attention(..., cu_seqlens=)``. Pass them all:
    ``model(**inputs, use_cache=False)``. Several rows of documents: concatenate them into one row
    first (positions restart at each row's start, so each row's documents stay documents).

    Raises:
        ValueError naming the field for missing or malformed ids, labels or mask, for padding
        that is not at the end of a row, and, for packed documents, for a batch of more than one
        row, boundaries that do not describe the row, or an attention_mask that pads.
    """
    check_layout(layout)
    packed = _packed_boundaries(batch, cu_seqlens)
    if packed is not None:
        return _shard_packed(batch, packed, layout=layout, group=group, pad_token_id=pad_token_id)
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"batch['input_ids'] must be an integer tensor (batch, seq), got {_describe(ids)}")
    labels = batch.get("labels")
    labels = ids if labels is None else labels
    if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
        raise ValueError(f"batch['labels'] must be a tensor shaped like input_ids {tuple(ids.shape)}, got {_describe(labels)}")
    shift = torch.full_like(labels, IGNORE, dtype=torch.int64)
    shift[:, :-1] = labels[:, 1:]
    mask = batch.get("attention_mask")
    if mask is not None:
        shift = _mask_right_padding(mask, ids, shift)
    _, rank, world = base_group(group)
    n = num_chunks(layout, world)
    ids, shift = pad_to_multiple(ids, n, value=pad_token_id), pad_to_multiple(shift, n, value=IGNORE)
    local_ids = shard_of(ids, layout, rank, world, dim=1)
    local_shift = shard_of(shift, layout, rank, world, dim=1)
    pos = layout_positions(layout, rank, world, local_ids.shape[1]).to(ids.device).expand(ids.shape[0], -1)
    return {
        "input_ids": local_ids,
        "position_ids": pos,
        "shift_labels": local_shift,
        "labels": local_shift,
        "num_items_in_batch": (shift != IGNORE).sum(),
    }


def _packed_boundaries(batch, cu_seqlens) -> torch.Tensor | None:
    """The batch's document boundaries (int64 on the CPU), or None for a batch of whole sequences:
    ``cu_seqlens`` if given, else ``batch['cu_seq_lens_q']``, else those of ``batch['position_ids']``
    when they restart at 0 mid-row."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    pos = batch.get("position_ids") if isinstance(batch, Mapping) else None
    if cu_seqlens is None and isinstance(batch, Mapping):
        cu_seqlens = batch.get("cu_seq_lens_q")  # DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    if cu_seqlens is None:
        if pos is None or not isinstance(ids, torch.Tensor) or not isinstance(pos, torch.Tensor) or pos.dim() == 0:
            return None
        if pos.dim() == 2 and pos.shape[0] > 1 and bool((pos[:, 1:] == 0).any()):
            raise ValueError(f"batch['position_ids'] {tuple(pos.shape)} restart at 0 inside a row: packed documents need a batch of "
                             f"one row (1, S); concatenate the rows (e.g. transformers.DataCollatorWithFlattening)")
        if pos.shape[-1] < 2 or not bool((pos.reshape(-1, pos.shape[-1])[:, 1:] == 0).any()):
            return None  # one document per row: the plain path (it checks nothing of position_ids)
        try:
            return cu_seqlens_from_positions(pos).to(torch.int64)
        except ValueError as e:
            raise ValueError(f"batch['position_ids']: {e}") from None
    problem = lengths_problem(cu_seqlens)
    if problem:
        raise ValueError(f"shard_inputs: {problem}")
    cu = cu_seqlens.detach().cpu().to(torch.int64)
    if isinstance(pos, torch.Tensor) and pos.dim() in (1, 2) and pos.shape[-1] == int(cu[-1]):
        if not bool((pos.reshape(-1, pos.shape[-1]).cpu() == document_positions(cu)).all()):
            raise ValueError("batch['position_ids'] do not restart at 0 at the documents of cu_seqlens; drop them (shard_inputs "
                             "computes each shard's positions) or pass matching ones")
    return cu


def _shard_packed(batch, cu: torch.Tensor, *, layout: str, group, pad_token_id: int) -> dict:
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"batch['input_ids'] must be an integer tensor (batch, seq), got {_describe(ids)}")
    if ids.shape[0] != 1:
        raise ValueError(f"packed documents need a batch of one row: batch['input_ids'] is {tuple(ids.shape)}; concatenate the "
                         f"rows into one (1, S) row and pass its cu_seqlens (e.g. transformers.DataCollatorWithFlattening)")
    total = ids.shape[1]
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but batch['input_ids'] holds {total} tokens: the boundaries must "
                         f"cover the whole packed row, [0, L_0, L_0 + L_1, ..., {total}]")
    labels = batch.get("labels")
    labels = ids if labels is None else labels
    if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
        raise ValueError(f"batch['labels'] must be a tensor shaped like input_ids {tuple(ids.shape)}, got {_describe(labels)}")
    mask = batch.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape or not bool(mask.bool().all())):
        raise ValueError(f"batch['attention_mask'] must be all ones (or absent) for packed documents, got {_describe(mask)} "
                         f"that pads: drop the padding, or make it a document of its own with -100 labels")
    shift = torch.full_like(labels, IGNORE, dtype=torch.int64)
    shift[:, :-1] = labels[:, 1:]
    ends = cu[1:][cu[1:] > cu[:-1]] - 1  # the last token of every non-empty document predicts nothing
    shift[:, ends.to(shift.device)] = IGNORE
    _, rank, world = base_group(group)
    docs = Documents(lengths_of(cu), layout, world)
    local_ids = shard_documents(ids, docs, rank, dim=1, value=pad_token_id)
    local_shift = shard_documents(shift, docs, rank, dim=1, value=IGNORE)
    cu32 = cu.to(device=ids.device, dtype=torch.int32)
    longest = max(docs.lengths)
    return {
        "input_ids": local_ids,
        "position_ids": docs.local_positions(rank).to(ids.device).unsqueeze(0),
        "shift_labels": local_shift,
        "labels": local_shift,
        "num_items_in_batch": (shift != IGNORE).sum(),
        "cu_seq_lens_q": cu32,
        "cu_seq_lens_k": cu32,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def _mask_right_padding(mask, ids, shift: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise ValueError(f"batch['attention_mask'] must be a tensor shaped like input_ids {tuple(ids.shape)}, got {_describe(mask)}")
    keep = mask.bool()
    right = (keep.int().diff(dim=1) <= 0).all(dim=1)  # ones then zeros in every row
    if not bool(right.all()):
        row = int((~right).nonzero()[0])
        raise ValueError(f"batch['attention_mask'] row {row} pads before or between real tokens: ringrt attention takes no padding "
                         f"mask, and only padding at the end of a row is exact without one (use padding_side='right')")
    nxt = torch.zeros_like(keep)
    nxt[:, :-1] = keep[:, 1:]
    return shift.masked_fill(~nxt, IGNORE)  # a pad is never a target (nor does a pad's prediction count)


def _describe(x) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
