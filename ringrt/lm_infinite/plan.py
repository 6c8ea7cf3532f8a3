"""Who sends which K/V rows to whom for Λ-mask attention on contiguous shards. Pure integers.

Note [Λ-mask halo]
------------------
Rank r holds tokens [rS, (r+1)S). Its queries need, besides its own keys:

* the *halo*: keys [max(0, rS - n_local + 1), rS) of its predecessors, for the local branch. Each
  predecessor p sends exactly the rows [max(pS, rS - n_local + 1), (p+1)S) -- at most n_local - 1
  tokens in all, from ceil((n_local - 1) / S) neighbours. Pairs of ranks the window does not reach
  exchange nothing.
* the *global tokens*: keys [0, G_r), G_r = min(n_global, (r+1)S - n_local) (0 if negative), for the
  global branch. They travel down a relay: rank t passes keys [0, M_{t+1}) to t + 1, built from what
  it received from t - 1 and its own rows, with M_t = min(E, tS) and E = min(G_{W-1}, (W-1)S) the
  most any rank needs from others. Every rank receives and sends at most n_global tokens, whatever
  the number of ranks::

        W = 4, S = 4, n_local = 6, n_global = 2 (h = halo row, g = global row via the relay)

                  keys ->  0 1 2 3 | 4 5 6 7 | 8 9 10 11 | 12 .. 15
        rank 1             h h h h | own     |           |             4 halo rows from rank 0
        rank 2             g g . h | h h h h | own       |             1 from rank 0, 4 from rank 1
        rank 3             g g . . | . . . h | h h h  h  | own         1 from rank 1, 4 from rank 2

  Rank 1 also gets keys [0, 2) from the relay (they sit inside its halo too; that is at most
  n_global tokens counted twice, on the first ranks only).

  With ``algorithm="tokenring"`` the halo K/V stay where they are: rank t sends each predecessor p
  whose keys its window reaches the query rows that need them, [tS, min((t+1)S, (p+1)S + n_local - 1)),
  and p sends back the partial (out, lse) of those rows over its keys (backward: q, dout, lse, delta
  down, the dq partial back; dK/dV never move). The global tokens still ride the relay.

  In the backward, halo gradients go straight back to their owners and global-token gradients run
  up the relay (rank t adds its own to what t + 1 sent and passes the sum to t - 1), so bytes per
  rank stay the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from .mask import LambdaMask, global_keys_needed


@dataclass(frozen=True, slots=True)
class Range:
    """Key rows [k0, k1) (token indices) exchanged with ``peer``."""

    peer: int
    k0: int
    k1: int

    @property
    def n(self) -> int:
        return self.k1 - self.k0


@dataclass(frozen=True, slots=True)
class HaloPlan:
    """What rank ``rank`` of ``world`` (``shard`` tokens each) exchanges in one Λ-mask call."""

    rank: int
    world: int
    shard: int
    halo_from: tuple[Range, ...]  # predecessors' rows this rank receives, ascending
    halo_to: tuple[Range, ...]  # own rows sent to successors
    q_to: tuple[Range, ...]  # "tokenring": own query rows [k0, k1) sent to the predecessors whose keys they need
    q_from: tuple[Range, ...]  # "tokenring": successors' query rows that need this rank's keys
    global_in: int  # keys [0, global_in) arrive from rank - 1 (0: no message)
    global_out: int  # keys [0, global_out) go to rank + 1 (0: no message)
    global_used: int  # keys [0, global_used) this rank's global branch reads

    @property
    def q0(self) -> int:
        return self.rank * self.shard

    @property
    def q1(self) -> int:
        return (self.rank + 1) * self.shard

    @property
    def halo_start(self) -> int:
        """First key index of the halo (= q0 when there is none)."""
        return self.halo_from[0].k0 if self.halo_from else self.q0

    @property
    def global_held(self) -> int:
        """Length of the global key buffer this rank assembles: it uses and forwards [0, global_held)."""
        return max(self.global_used, self.global_out)


def _window_start(t: int, shard: int, mask: LambdaMask) -> int:
    return max(0, t * shard - mask.n_local + 1)


def _external_global(t: int, shard: int, mask: LambdaMask) -> int:
    """Global keys rank t needs from other ranks: [0, min(G_t, tS))."""
    return min(global_keys_needed((t + 1) * shard - 1, mask), t * shard)


def halo_plan(rank: int, world: int, shard: int, mask: LambdaMask) -> HaloPlan:
    """The exchange plan of ``rank`` (see Note [Λ-mask halo])."""
    s = shard
    lo = _window_start(rank, s, mask)
    halo_from = tuple(Range(p, max(lo, p * s), (p + 1) * s) for p in range(lo // s, rank))
    halo_to = []
    for t in range(rank + 1, world):
        lo_t = _window_start(t, s, mask)
        if lo_t >= (rank + 1) * s:
            break
        halo_to.append(Range(t, max(lo_t, rank * s), (rank + 1) * s))
    reach = lambda p, t: min((t + 1) * s, (p + 1) * s + mask.n_local - 1)  # noqa: E731  rows of t needing p's keys end here
    q_to = tuple(Range(r.peer, rank * s, reach(r.peer, rank)) for r in halo_from)
    q_from = tuple(Range(r.peer, r.peer * s, reach(rank, r.peer)) for r in halo_to)
    e = _external_global(world - 1, s, mask)
    relay = [min(e, t * s) for t in range(world + 1)]  # M_t
    return HaloPlan(
        rank=rank,
        world=world,
        shard=s,
        halo_from=halo_from,
        halo_to=tuple(halo_to),
        q_to=q_to,
        q_from=q_from,
        global_in=relay[rank],
        global_out=relay[rank + 1] if rank + 1 < world else 0,
        global_used=global_keys_needed((rank + 1) * s - 1, mask),
    )
