"""Score-matrix area a block kernel actually computes, per kernel tiling. Pure integers.

``ideal``: a causal (top-left) block costs half its rectangle, as on GPUs, whose tiles are small
next to the blocks priced here.

``aten_cpu``: aten's CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its
backward) walks the queries in tiles of ``q_split`` rows and, for each, the keys in tiles of
``kv_split`` columns up to the tile's last query; it skips only whole key tiles above the diagonal::

    q_split  = 256 if Sq >= 768 else 64 if Sq >= 192 else 32
    kv_split = 512 if Sk >= 512 else Sk

    Sk = 1024, Sq = 1024 (q tiles of 256, key tiles of 512; 1 = computed):
        q   0..255   1 0        keys computed: 512
        q 256..511   1 0                       512
        q 512..767   1 1                      1024
        q 768..1023  1 1                      1024   -> 3072 / 4096 = 0.75 of the full rectangle

So a causal block below 512 keys costs its full rectangle (measured on this kernel: 1.00-1.03x the
non-causal time at 128-512 tokens, 0.76x at 1024, 0.65x at 2048 against 0.75 and 0.625 here).
"""

from __future__ import annotations

from typing import Literal

Tiling = Literal["ideal", "aten_cpu"]


def aten_cpu_splits(sq: int, sk: int) -> tuple[int, int]:
    """(query tile rows, key tile columns) aten's CPU flash kernel uses for an sq x sk block."""
    q_split = 256 if sq >= 768 else (64 if sq >= 192 else 32)
    kv_split = 512 if sk >= 512 else sk
    return q_split, kv_split


def computed_area(sq: int, sk: int, *, causal: bool, tiling: Tiling) -> float:
    """Query x key pairs the kernel computes for one sq x sk block (top-left causal if ``causal``)."""
    if not causal:
        return float(sq * sk)
    if tiling == "ideal":
        return 0.5 * sq * sk
    if tiling != "aten_cpu":
        raise ValueError(f"tiling={tiling!r} is not modelled; valid: 'ideal', 'aten_cpu'")
    q_split, kv_split = aten_cpu_splits(sq, sk)
    area = 0
    for m in range(0, sq, q_split):
        rows = min(q_split, sq - m)
        last_key = min(m + rows, sk)
        keys = min(-(-last_key // kv_split) * kv_split, sk)
        area += rows * keys
    return float(area)
