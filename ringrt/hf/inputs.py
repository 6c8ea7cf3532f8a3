"""This rank's shard of a Hugging Face batch: :func:`shard_inputs`."""

from __future__ import annotations

from typing import Mapping

import torch

from ..distributed.groups import base_group
from ..ops.layout import check_layout, num_chunks, pad_to_multiple, positions as layout_positions, shard_of

IGNORE = -100


def shard_inputs(batch: Mapping[str, torch.Tensor], *, layout: str = "zigzag", group=None, pad_token_id: int = 0) -> dict:
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

    Raises:
        ValueError naming the field for missing or malformed ids, labels or mask, and for padding
        that is not at the end of a row.
    """
    check_layout(layout)
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
