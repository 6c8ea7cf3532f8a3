"""``ringrt eval --eval.stream_multiples ...``: Λ-mask perplexity of one sequence far longer than
memory holds, read window by window through one :class:`ringrt.LambdaKVCache` per layer, the
sequence cut into one contiguous segment per rank.

Note [streaming Λ evaluation]
-----------------------------
A Λ-mask query i sees the keys of the first n_global tokens (G) and of the last n_local tokens
(i - n_local + 1 .. i). So token i's input to layer l + 1 depends on the globals and on the layer-l
inputs of tokens i - n_local + 1 .. i; after L layers, on the globals and on the input tokens
i - L * (n_local - 1) .. i — its receptive field. A segment [a, b) of the scored tokens can
therefore be computed exactly, without the rest of the sequence, from::

      tokens  0 .. n_global-1     (G: streamed first, so every layer's cache holds their K/V)
      tokens  w .. a-1            (warm-up, w = a - L * (n_local - 1); streamed, not scored)
      tokens  a .. b-1            (scored, window by window; targets a+1 .. b)

    rank 0:  |G|warm|==== scored a0..b0 ====|
    rank 1:  |G|                        |warm|==== scored a1..b1 ====|
    rank 2:  |G|                                                 |warm|==== ... ====|
             0                                                                       N

After the globals, each layer's cache forgets everything but G and continues at token w
(:meth:`ringrt.LambdaKVCache.skip_to`): the missing tokens n_global .. w - 1 change layer 1's outputs
only for queries i < w + n_local - 1, layer 2's for i < w + 2 (n_local - 1), ... and the logits
only for i < w + L (n_local - 1) = a, none of which is scored. (The bound is tight: one warm-up
token fewer changes token a's logits; ``tests/test_stream_eval.py`` checks both.) Every scored
token is thus computed from exactly the keys the full-sequence Λ-mask gives it — at the same
absolute positions, so the same RoPE angles — and the result equals one stream over the whole
sequence (and ``ringrt.lambda_attention`` over it) up to floating-point summation order. The
ranks never talk until the end: one all_reduce of the per-bin (nll, count) sums. The work is
N + W * (L * (n_local - 1) + n_global) token-forwards: embarrassingly parallel.

Memory is constant in N: a layer's cache holds at most n_global + n_local rows between windows
and n_global + n_local + window inside one (the window's own tokens), the logits of one window are
the largest tensor, and the text is read forward as a stream (``TokenReader``); nothing of length
N is ever built.

Text. The validation split (``ringrt.data.batching.val_files``) starts with <bos> (as every
``eval_sequences`` window does) and continues as the validation token stream; when that stream is
shorter than the sequence it is repeated cyclically (each pass's last document ends with <eos>,
the next pass starts without a new <bos>), and the job says how many distinct tokens were scored.
Repetition cannot be remembered: the receptive field (n_global + L * (n_local - 1) tokens, about a
thousand for the demo model) is far shorter than one pass, so a repeated pass re-scores the same
text at new, larger positions — what this evaluation tests. Training text is never used.

The reference at 1x (``eval.stream_baseline``): the same validation text cut into windows of
train_len + 1 tokens (``eval_sequences``, each window with its own <bos>, so window j's targets are
validation tokens j * train_len .. (j + 1) * train_len - 1), scored with fresh caches,
data-parallel over the ranks, and each target weighted by how often the stream scores it
(:func:`baseline_weights`: whole passes, plus the partial last one). It is the perplexity of the
same multiset of scored text when the model sees no more than its training length, so
``perplexity / baseline_1x`` isolates what the length does (up to the < train_len validation tokens
after the last whole window, which the reference leaves out).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.batching import token_stream, val_files
from ..data.config import DataConfig
from ..distributed import device as devices
from ..lm_infinite import LambdaKVCache, LambdaMask


@dataclass(frozen=True, slots=True)
class Segment:
    """One rank's share of a stream of ``n`` scored tokens (inputs 0 .. n-1, targets 1 .. n)."""

    start: int
    """First scored input token (a)."""
    stop: int
    """One past the last scored input token (b); the rank reads tokens up to b (the last target)."""
    warm: int
    """First token streamed after the globals (w <= a); 0 = stream from the start, no skip."""


def plan_segments(n: int, world: int, *, n_layers: int, mask: LambdaMask) -> list[Segment]:
    """Contiguous, near-equal segments of ``n`` scored tokens, one per rank, each with its warm-up
    start (Note [streaming Λ evaluation]). Pure integers."""
    reach = n_layers * (mask.n_local - 1)  # receptive field beyond the globals
    out = []
    for r in range(world):
        a, b = r * n // world, (r + 1) * n // world
        w = a - reach
        out.append(Segment(start=a, stop=b, warm=w if w > mask.n_global else 0))
    return out


class StreamAttend:
    """The model's ``attend`` for streaming: one :class:`ringrt.LambdaKVCache` per layer; each call appends
    the window's k/v and returns its queries' Λ-mask attention. ``peak_rows`` is the largest number
    of K/V rows any layer attended over (cached + the window's own): at most
    n_global + n_local + window."""

    rotates = True

    def __init__(self, *, n_layers: int, mask: LambdaMask, rope_theta: float):
        self.caches = [LambdaKVCache(mask=mask, rope_theta=rope_theta) for _ in range(n_layers)]
        self.peak_rows = 0

    def __call__(self, q, k, v, *, layer, positions):
        cache = self.caches[layer]
        self.peak_rows = max(self.peak_rows, len(cache) + k.shape[1])
        return cache.attend(q, k, v, positions)  # (B, T, H, D)

    def skip_to(self, seen: int) -> None:
        for c in self.caches:
            c.skip_to(seen)

    @property
    def seen(self) -> int:
        return self.caches[0].seen

    def rows(self) -> int:
        """K/V rows kept now (the largest layer)."""
        return max(len(c) for c in self.caches)


class TokenReader:
    """Forward-only reads of a token stream by absolute index: ``take(lo, hi)`` -> tokens lo .. hi-1
    (int64); later reads may start anywhere at or after the previous read's last token."""

    def __init__(self, tokens: Iterator[int]):
        self._it, self._buf, self._buf_lo = tokens, [], 0  # _buf holds tokens _buf_lo .. _buf_lo + len - 1

    def take(self, lo: int, hi: int) -> torch.Tensor:
        if lo < self._buf_lo:
            raise ValueError(f"TokenReader.take({lo}, {hi}): reads go forward; token {self._buf_lo} was the earliest kept")
        if lo > self._buf_lo + len(self._buf):  # skip without keeping
            gap = lo - self._buf_lo - len(self._buf)
            for _ in itertools.islice(self._it, gap):
                pass
            self._buf, self._buf_lo = [], lo
        del self._buf[: lo - self._buf_lo]
        self._buf_lo = lo
        self._buf.extend(itertools.islice(self._it, hi - lo - len(self._buf)))
        if len(self._buf) < hi - lo:
            raise ValueError(f"the token stream ended at token {self._buf_lo + len(self._buf)}, before {hi}")
        return torch.tensor(self._buf[: hi - lo], dtype=torch.int64)


def validation_tokens(cfg: DataConfig, tok) -> tuple[Callable[[], Iterator[int]], int]:
    """(a factory of the stream: <bos> (with data.add_bos) then the validation tokens repeated
    cyclically, the length of one pass of the validation tokens)."""
    files = val_files(cfg)
    per_pass = sum(1 for _ in token_stream(files, tok, cfg.jsonl_field))
    if per_pass == 0:
        raise ValueError("the validation text is empty; add data (data.paths) or raise data.val_percent")
    bos = getattr(tok, "bos_id", None) if cfg.add_bos else None

    def stream() -> Iterator[int]:
        if bos is not None:
            yield bos
        while True:
            yield from token_stream(files, tok, cfg.jsonl_field)

    return stream, per_pass


def bins_for(n: int, train_len: int) -> list[int]:
    """Bin edges over the scored inputs: [0, L), [L, 2L), [2L, 4L), ... , [.., n) (L = train_len)."""
    edges, e = [0], train_len
    while e < n:
        edges.append(e)
        e *= 2
    return edges + [n]


@dataclass(slots=True)
class StreamScore:
    """Per-bin sums of one rank's scored tokens: nll (fp64) and count, bins of :func:`bins_for`."""

    edges: list[int]
    nll: torch.Tensor  # (n_bins,) fp64
    count: torch.Tensor  # (n_bins,) fp64

    @classmethod
    def empty(cls, edges: list[int]) -> StreamScore:
        z = torch.zeros(len(edges) - 1, dtype=torch.float64)
        return cls(edges, z, z.clone())

    def add(self, first: int, losses: torch.Tensor) -> None:
        """Per-token losses (T,) of the inputs first .. first + T - 1."""
        idx = torch.bucketize(torch.arange(first, first + losses.numel()), torch.tensor(self.edges[1:-1]), right=True)
        self.nll.index_add_(0, idx, losses.detach().to(torch.float64).cpu())
        self.count.index_add_(0, idx, torch.ones(losses.numel(), dtype=torch.float64))

    def perplexity(self) -> float:
        return math.exp(self.nll.sum().item() / max(1.0, self.count.sum().item()))


def _forward(model, attend: StreamAttend, ids: torch.Tensor, first: int) -> torch.Tensor:
    """Logits (B, T, V) of inputs ids (B, T) at positions first .. first + T - 1."""
    positions = torch.arange(first, first + ids.shape[1], device=ids.device)
    return model(ids, positions=positions, attend=attend)


def stream_segment(model, read: TokenReader, seg: Segment, *, mask: LambdaMask, window: int, score: StreamScore,
                   progress: Callable[[int, int], None] | None = None) -> StreamAttend:
    """Stream one segment through ``model`` (Note [streaming Λ evaluation]) and add its scored
    tokens' losses to ``score``. ``progress(done, total)`` after each scored window. Returns the
    attend (its caches, for inspection)."""
    cfg = model.config
    device = devices.module_device(model)
    attend = StreamAttend(n_layers=cfg.n_layers, mask=mask, rope_theta=cfg.rope_theta)
    if seg.warm and mask.n_global:  # the globals first, then jump to the warm-up start
        _forward(model, attend, read.take(0, mask.n_global)[None].to(device), 0)
    if seg.warm:
        attend.skip_to(seg.warm)
    pos = seg.warm
    while pos < seg.stop:
        end = min(pos + window, seg.stop) if pos >= seg.start else min(pos + window, seg.start)
        toks = read.take(pos, end + 1).to(device)  # inputs pos .. end-1 and their targets
        logits = _forward(model, attend, toks[None, :-1], pos)  # (1, T, V)
        if end > seg.start:
            lo = max(0, seg.start - pos)
            lg = logits[0, lo:]
            lg = lg if lg.dtype == torch.float64 else lg.float()
            score.add(pos + lo, F.cross_entropy(lg, toks[1 + lo:], reduction="none"))
            if progress is not None:
                progress(end - seg.start, seg.stop - seg.start)
        pos = end
    return attend


def windowed_baseline(model, seqs: torch.Tensor, weights: torch.Tensor, *, mask: LambdaMask, batch: int = 16) -> tuple[float, float]:
    """(weighted nll sum, sum of the weights), fp64, of sequences (N, L + 1), each scored on its own
    (Λ-mask, fresh caches), ``batch`` sequences per forward; weights (N, L) per target token."""
    cfg = model.config
    device = devices.module_device(model)
    nll, count = 0.0, 0.0
    for i in range(0, seqs.shape[0], batch):
        s, w = seqs[i:i + batch].to(device), weights[i:i + batch].to(device, torch.float64)
        attend = StreamAttend(n_layers=cfg.n_layers, mask=mask, rope_theta=cfg.rope_theta)
        logits = _forward(model, attend, s[:, :-1], 0)  # (b, L, V)
        lg = logits if logits.dtype == torch.float64 else logits.float()
        losses = F.cross_entropy(lg.flatten(0, 1), s[:, 1:].flatten(), reduction="none").double()  # (b * L,)
        nll += (losses * w.flatten()).sum().item()
        count += w.sum().item()
    return nll, count


def baseline_weights(n: int, per_pass: int, windows: int, train_len: int) -> torch.Tensor:
    """(windows, train_len) weights: how often the stream of ``n`` scored tokens scores each target of
    the 1x windows (window j's targets are validation tokens j * train_len .. (j + 1) * train_len - 1).
    The stream's target t (t >= 1) is validation token (t - 1) mod per_pass, so token k is scored
    n // per_pass times, once more when k < n mod per_pass."""
    k = torch.arange(windows * train_len, dtype=torch.int64).view(windows, train_len)
    return (n // per_pass + (k < n % per_pass).long()).to(torch.float64)


def check_stream_settings(e, train_len: int, world: int) -> None:
    """ValueError naming the setting, before any communication (every rank raises the same)."""
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in e.stream_multiples):
        raise ValueError(f"eval.stream_multiples={e.stream_multiples} must be positive integers (multiples of train_len "
                         f"{train_len}); empty = no streaming evaluation")
    if isinstance(e.stream_window, bool) or not isinstance(e.stream_window, int) or e.stream_window < 1:
        raise ValueError(f"eval.stream_window={e.stream_window!r} must be a positive integer (tokens per forward, "
                         f"e.g. 256)")
    for m in e.stream_multiples:
        if m * train_len < world:
            raise ValueError(f"eval.stream_multiples: {m} x train_len {train_len} = {m * train_len} tokens cannot be "
                             f"split over {world} ranks; valid: multiples with m x {train_len} >= {world}")


class _Progress:
    """Rank 0's progress lines: at most one every ``every_s`` seconds, and at the end."""

    def __init__(self, say, world: int, score: StreamScore, every_s: float = 15.0):
        self.say, self.world, self.score, self.every_s = say, world, score, every_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and done < total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (total - done) / max(rate, 1e-9)
        self.say(f"stream: rank 0 {done:>9}/{total} tokens ({100 * done / total:3.0f} %), {rate:7.0f} tok/s per rank "
                 f"(~{rate * self.world:.0f} on {self.world}), running perplexity {self.score.perplexity():.3f}, "
                 f"eta {eta:.0f} s")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _baseline_share(cfg: DataConfig, tok, model, mask: LambdaMask, *, n: int, per_pass: int, train_len: int, rank: int,
                    world: int) -> tuple[float, float]:
    """This rank's share (windows rank, rank + world, ...) of the 1x reference, weighted like the stream."""
    from ..data.batching import eval_sequences

    windows = max(1, -(-min(n, per_pass) // train_len))  # the windows holding the stream's distinct targets
    seqs = eval_sequences(cfg, tok, train_len, windows)  # (windows, train_len + 1), each with its <bos>
    weights = baseline_weights(n, per_pass, seqs.shape[0], train_len)
    return windowed_baseline(model, seqs[rank::world], weights[rank::world], mask=mask)


@torch.no_grad()
def stream_perplexity(model, cfg: DataConfig, tok, *, n: int, train_len: int, mask: LambdaMask, window: int,
                      baseline: bool, say=print, autocast=contextlib.nullcontext) -> dict:
    """Λ-mask perplexity of the first ``n`` scored tokens of the (cyclic) validation stream, one
    segment per rank, plus (``baseline``) the 1x windowed reference. Every rank returns the same dict.
    One all_reduce at the end."""
    rank, world = _rank_world()
    seg = plan_segments(n, world, n_layers=model.config.n_layers, mask=mask)[rank]
    stream, per_pass = validation_tokens(cfg, tok)
    edges = bins_for(n, train_len)
    score = StreamScore.empty(edges)
    say(f"stream: {n} tokens ({n // train_len} x train_len {train_len}) on {world} rank{'s' if world > 1 else ''}, "
        f"window {window}, Λ-mask n_global={mask.n_global} n_local={mask.n_local}; validation text {per_pass} tokens"
        f"{f', repeated cyclically ({n / per_pass:.2f} passes)' if n > per_pass else ''}")
    t0 = time.perf_counter()
    with autocast():
        attend = stream_segment(model, TokenReader(stream()), seg, mask=mask, window=window, score=score,
                                progress=_Progress(say, world, score) if rank == 0 else None)
        t_stream = time.perf_counter() - t0
        base = (_baseline_share(cfg, tok, model, mask, n=n, per_pass=per_pass, train_len=train_len, rank=rank, world=world)
                if baseline else (0.0, 0.0))
    t_all = time.perf_counter() - t0
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    mine = torch.zeros(world, 3, dtype=torch.float64)
    mine[rank] = torch.tensor([rss_mib, t_stream, t_all], dtype=torch.float64)
    packed = torch.cat([score.nll, score.count, torch.tensor(base, dtype=torch.float64), mine.flatten()])
    if world > 1:
        dist.all_reduce(packed)  # the only communication
    return _summary(packed, edges, n=n, per_pass=per_pass, train_len=train_len, world=world, window=window,
                    peak_rows=attend.peak_rows, mask=mask, baseline=baseline)


def _summary(packed: torch.Tensor, edges: list[int], *, n: int, per_pass: int, train_len: int, world: int, window: int,
             peak_rows: int, mask: LambdaMask, baseline: bool) -> dict:
    k = len(edges) - 1
    nll, cnt = packed[:k], packed[k:2 * k]
    b_nll, b_cnt = packed[2 * k].item(), packed[2 * k + 1].item()
    per_rank = packed[2 * k + 2:].view(world, 3)
    cum_nll, cum_cnt = nll.cumsum(0), cnt.cumsum(0)
    t_stream = per_rank[:, 1].max().item()
    ppl = math.exp(cum_nll[-1].item() / cum_cnt[-1].item())
    out = {
        "tokens": n, "train_len": train_len, "multiple": n / train_len, "world": world, "window": window,
        "n_global": mask.n_global, "n_local": mask.n_local,
        "validation_tokens": per_pass, "distinct_tokens_scored": min(n, per_pass), "passes": n / per_pass,
        "perplexity": ppl,
        "perplexity_1x_prefix": math.exp(cum_nll[0].item() / cum_cnt[0].item()),
        "prefix_perplexity": {str(edges[i + 1]): math.exp(cum_nll[i].item() / cum_cnt[i].item()) for i in range(k)},
        "bin_perplexity": {f"{edges[i]}-{edges[i + 1]}": math.exp(nll[i].item() / cnt[i].item()) for i in range(k)},
        "stream_s": t_stream, "total_s": per_rank[:, 2].max().item(), "tokens_per_s": n / max(t_stream, 1e-9),
        "peak_rss_mib": per_rank[:, 0].tolist(), "peak_cache_rows": peak_rows,
    }
    if baseline:
        out["baseline_1x"] = math.exp(b_nll / b_cnt)
        out["baseline_1x_tokens"] = int(b_cnt)  # weighted: scored tokens of the stream it stands for
        out["ratio_to_baseline_1x"] = ppl / out["baseline_1x"]
    return out


def stream_table(rows: list[dict]) -> str:
    """One line per streamed length."""
    lines = ["Λ-mask streaming perplexity (one sequence; ratio = perplexity / 1x windowed reference on the same text)",
             f"{'tokens':>10}{'x train':>9}{'ppl':>9}{'1x ref':>9}{'ratio':>8}{'1x prefix':>11}{'tok/s':>9}{'stream s':>10}"
             f"{'distinct':>10}{'rss MiB':>9}"]
    for r in rows:
        ref = f"{r['baseline_1x']:.3f}" if "baseline_1x" in r else "-"
        ratio = f"{r['ratio_to_baseline_1x']:.4f}" if "baseline_1x" in r else "-"
        lines.append(f"{r['tokens']:>10}{r['multiple']:>9.0f}{r['perplexity']:>9.3f}{ref:>9}{ratio:>8}"
                     f"{r['perplexity_1x_prefix']:>11.3f}{r['tokens_per_s']:>9.0f}{r['stream_s']:>10.1f}"
                     f"{r['distinct_tokens_scored']:>10}{max(r['peak_rss_mib']):>9.0f}")
    return "\n".join(lines)


def run_stream(cfg, model, tok, *, train_len: int, autocast, say) -> list[dict]:
    """One streamed perplexity per ``eval.stream_multiples`` (an ``EvalJobConfig``), a line each."""
    from ..model.parallel import lambda_mask

    e, rows = cfg.eval, []
    mask = lambda_mask(cfg.attention, train_len)
    for m in e.stream_multiples:
        r = stream_perplexity(model, cfg.data, tok, n=m * train_len, train_len=train_len, mask=mask, window=e.stream_window,
                              baseline=e.stream_baseline, say=say, autocast=autocast)
        ref = (f"; 1x reference {r['baseline_1x']:.3f} on {r['baseline_1x_tokens']} tokens, ratio {r['ratio_to_baseline_1x']:.4f}"
               if "baseline_1x" in r else "")
        say(f"eval:  stream at {r['tokens']:>7} tokens: perplexity {r['perplexity']:.3f} (first {train_len}: "
            f"{r['perplexity_1x_prefix']:.3f}){ref}; {r['distinct_tokens_scored']} distinct tokens scored; "
            f"{r['stream_s']:.1f} s, {r['tokens_per_s']:.0f} tok/s, peak RSS {max(r['peak_rss_mib']):.0f} MiB per rank")
        rows.append(r)
    return rows
