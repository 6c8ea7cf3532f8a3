"""The LM-Infinite Λ-mask: its settings, its block classification and its additive masks. Pure math.

Token i (its index in the full sequence) attends to key j through one of two branches::

    local  branch:  0 <= i - j < n_local                         q and k rotated to their positions
    global branch:  j < n_global  and  i - j >= n_local          k NOT rotated, q rotated to
                                                                 min(limit_distance, i)

and one softmax runs over both. Picture, n_global = 2, n_local = 3 (L = local, G = global)::

             keys j ->  0 1 2 3 4 5 6 7
      query i   0       L . . . . . . .
                1       L L . . . . . .
                2       L L L . . . . .
                3       G L L L . . . .
                4       G G L L L . . .
                5       G G . L L L . .
                6       G G . . L L L .
                7       G G . . . L L L

A global key carries no rotation (position 0) and the query is rotated to min(limit_distance, i),
so q·k sees the relative distance min(limit_distance, i): with the default limit_distance =
n_local every far global token sits at distance exactly n_local (the model has seen distances up
to its pre-training length only). This is LM-Infinite's ``models/lambda_attention.py`` +
``models/llama.py``. Its prefill path rotates every global-branch query to min(limit_distance, N-1)
(N the call's length); its decode path (one query i) to min(limit_distance, i). The two agree for
every limit_distance <= n_local (global-branch queries have i >= n_local). We use min(limit_distance,
i) everywhere, so prefill and decode agree and no output depends on later tokens.

Blocks. A (query block [q0, q1)) x (key block [k0, k1)) pair, in token indices, is *empty* (no
compute, no communication), *dense* (every entry kept: runs without a mask) or *partial* (an
explicit additive mask built from the absolute indices).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

_NEG_INF = float("-inf")


@dataclass(kw_only=True, slots=True, frozen=True)
class LambdaMask:
    """LM-Infinite's Λ-shaped attention mask (flags ``--global_branch --local_branch --limit_distance``).

    n_global = 0 is plain causal sliding-window attention of width n_local (see :func:`sliding_window`).
    """

    n_global: int
    """Number of leading tokens every query may attend to (LM-Infinite's ``global_branch``; 10..100)."""
    n_local: int
    """Window width: query i sees keys i - n_local + 1 .. i with normal RoPE (``local_branch``;
    the pre-training length, e.g. 2048 or 4096)."""
    limit_distance: int | None = None
    """Largest relative distance RoPE shows for a global key; default n_local (``limit_distance``)."""

    @property
    def limit(self) -> int:
        """The effective limit_distance."""
        return self.n_local if self.limit_distance is None else self.limit_distance

    def problem(self) -> str | None:
        """The first invalid setting, as a message naming it, its value and the valid range; or None."""
        for name in ("n_global", "n_local", "limit_distance"):
            val = getattr(self, name)
            if name == "limit_distance" and val is None:
                continue
            if isinstance(val, bool) or not isinstance(val, int):
                return f"LambdaMask.{name}={val!r} must be an int"
        if self.n_global < 0:
            return f"LambdaMask.n_global={self.n_global} must be >= 0 (0 = plain sliding window)"
        if self.n_local < 1:
            return f"LambdaMask.n_local={self.n_local} must be >= 1 (the window includes the query itself)"
        if self.limit_distance is not None and self.limit_distance < 0:
            return f"LambdaMask.limit_distance={self.limit_distance} must be >= 0 or None (= n_local)"
        return None


def sliding_window(window: int) -> LambdaMask:
    """Causal sliding-window attention: query i sees keys i - window + 1 .. i (no global tokens)."""
    return LambdaMask(n_global=0, n_local=window)


class Kind(enum.Enum):
    EMPTY = 0
    DENSE = 1
    PARTIAL = 2


def classify_local(q0: int, q1: int, k0: int, k1: int, n_local: int) -> Kind:
    """Local branch of queries [q0, q1) x keys [k0, k1) (non-empty ranges)."""
    if not (k0 < q1 and q0 - (k1 - 1) <= n_local - 1):
        return Kind.EMPTY
    if (k1 - 1) <= q0 and (q1 - 1 - k0) <= n_local - 1:
        return Kind.DENSE
    return Kind.PARTIAL


def classify_global(q0: int, q1: int, k0: int, k1: int, n_global: int, n_local: int) -> Kind:
    """Global branch of queries [q0, q1) x keys [k0, k1) (non-empty ranges)."""
    k1 = min(k1, n_global)
    if k0 >= k1 or (q1 - 1) - k0 < n_local:
        return Kind.EMPTY
    if q0 - (k1 - 1) >= n_local:
        return Kind.DENSE
    return Kind.PARTIAL


def local_bias(q0: int, q1: int, k0: int, k1: int, n_local: int, dtype, device=None) -> torch.Tensor:
    """(q1-q0, k1-k0) additive mask of the local branch: 0 where 0 <= i - j < n_local, else -inf."""
    d = torch.arange(q0, q1, device=device).unsqueeze(1) - torch.arange(k0, k1, device=device)  # (Sq, Sk) i - j
    keep = (d >= 0) & (d < n_local)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, _NEG_INF)


def global_bias(q0: int, q1: int, k0: int, k1: int, n_local: int, dtype, device=None) -> torch.Tensor:
    """(q1-q0, k1-k0) additive mask of the global branch over keys that are global: 0 where i - j >= n_local."""
    d = torch.arange(q0, q1, device=device).unsqueeze(1) - torch.arange(k0, k1, device=device)
    return torch.zeros(d.shape, dtype=dtype, device=device).masked_fill_(d < n_local, _NEG_INF)


@dataclass(frozen=True, slots=True)
class Tile:
    """One kernel call: queries [q0, q1) x keys [k0, k1) (token indices), ``dense`` = no mask needed."""

    q0: int
    q1: int
    k0: int
    k1: int
    dense: bool


def _runs(q0: int, q1: int, edges: list[tuple[int, int]], kinds: list[Kind]) -> list[Tile]:
    """Merge consecutive key tiles of the same (non-empty) kind into one call each."""
    out: list[Tile] = []
    for (a, b), kind in zip(edges, kinds, strict=True):
        if kind is Kind.EMPTY:
            continue
        dense = kind is Kind.DENSE
        if out and out[-1].dense == dense and out[-1].k1 == a:
            out[-1] = Tile(q0, q1, out[-1].k0, b, dense)
        else:
            out.append(Tile(q0, q1, a, b, dense))
    return out


def local_tiles(q0: int, q1: int, k0: int, k1: int, n_local: int, block: int) -> list[Tile]:
    """Kernel calls covering the local branch of queries [q0, q1) against available keys [k0, k1).

    Queries are cut into tiles of ``block`` rows; keys into tiles on the same grid (anchored at q0).
    Each (query tile, key tile) pair is classified; empty pairs are dropped and consecutive pairs of
    the same kind become one call, so each query tile costs at most about block x (n_local + block)
    score entries: the work grows linearly with the sequence.
    """
    tiles: list[Tile] = []
    for a in range(q0, q1, block):
        b = min(a + block, q1)
        lo, hi = max(k0, a - n_local + 1), min(k1, b)
        if lo >= hi:
            continue
        first = q0 + ((lo - q0) // block) * block  # grid line at or below lo
        edges = [(max(c, lo), min(c + block, hi)) for c in range(first, hi, block)]
        tiles += _runs(a, b, edges, [classify_local(a, b, x, y, n_local) for x, y in edges])
    return tiles


def global_tiles(q0: int, q1: int, n_keys: int, mask: LambdaMask, block: int) -> list[Tile]:
    """Kernel calls covering the global branch of queries [q0, q1) against global keys [0, n_keys)."""
    tiles: list[Tile] = []
    if n_keys <= 0:
        return tiles
    for a in range(q0, q1, block):
        b = min(a + block, q1)
        kind = classify_global(a, b, 0, n_keys, mask.n_global, mask.n_local)
        if kind is not Kind.EMPTY:
            tiles.append(Tile(a, b, 0, min(n_keys, mask.n_global), kind is Kind.DENSE))
    return tiles


def global_keys_needed(last_query: int, mask: LambdaMask) -> int:
    """How many leading keys [0, g) the global branch of queries up to ``last_query`` uses."""
    return max(0, min(mask.n_global, last_query - mask.n_local + 1))


def stationary_positions(index: torch.Tensor, mask: LambdaMask) -> torch.Tensor:
    """Positions the global branch rotates queries to: min(limit_distance, i) (int64, like index)."""
    return index.clamp(max=mask.limit)
