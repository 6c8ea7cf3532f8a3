"""Streaming Λ-mask evaluation (ringrt/jobs/stream_eval.py): exact against the full-sequence Λ-mask,
segments (one per rank) equal one stream, memory bounded, settings checked."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ringrt.data.config import DataConfig
from ringrt.jobs.config import EvalConfig
from ringrt.jobs.stream_eval import (
    Segment,
    StreamScore,
    TokenReader,
    baseline_weights,
    bins_for,
    check_stream_settings,
    plan_segments,
    stream_perplexity,
    stream_segment,
    validation_tokens,
)
from ringrt.lm_infinite import LambdaMask
from ringrt.model.config import ModelConfig
from ringrt.model.llama import Llama
from ringrt.model.parallel import LambdaAttend
from tests.distributed import run

MASK = LambdaMask(n_global=3, n_local=8)
# fp64 runs of the same math in two summation orders agree to ~1e-15 relative; fp32 ones to ~1e-6
# (measured in test_tolerance_separates_fp64_from_fp32). 1e-10 sits between: it passes only when the
# streamed tokens see exactly the keys of the full sequence.
TOL = 1e-10


def _model(dtype=torch.float64, seed=0, vocab=37) -> Llama:
    torch.manual_seed(seed)
    m = Llama(ModelConfig(vocab_size=vocab, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=64))
    for p in m.parameters():  # larger weights than the init: attention patterns far from uniform
        p.data.mul_(4.0)
    return m.to(dtype).eval()


def _tokens(n: int, seed=1) -> torch.Tensor:
    return torch.randint(0, 37, (n + 1,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _full_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token losses (n,) of the full-sequence Λ-mask (ringrt.lambda_attention, one process)."""
    attend = LambdaAttend(mask=MASK, rope_theta=model.config.rope_theta, group=None)
    logits = model(ids[None, :-1], attend=attend)[0]
    return F.cross_entropy(logits, ids[1:], reduction="none")


class _Losses(StreamScore):
    """A StreamScore that also keeps every token's loss (tests only)."""

    def add(self, first, losses):
        super().add(first, losses)
        self.per_token[first:first + losses.numel()] = losses.detach()


def _stream_losses(model, ids: torch.Tensor, segments: list[Segment], window: int) -> tuple[torch.Tensor, list]:
    n = ids.numel() - 1
    score = _Losses.empty(bins_for(n, 16))
    score.per_token = torch.full((n,), float("nan"), dtype=torch.float64)
    attends = []
    with torch.no_grad():
        for seg in segments:  # each segment as its own rank would run it: its own reader and caches
            attends.append(stream_segment(model, TokenReader(iter(ids.tolist())), seg, mask=MASK, window=window, score=score))
    return score.per_token, attends


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.timeout(60)
def test_stream_equals_full_sequence_lambda_and_segments_equal_one_stream():
    model, ids = _model(), _tokens(240)
    full = _full_losses(model, ids)
    one, _ = _stream_losses(model, ids, plan_segments(240, 1, n_layers=3, mask=MASK), window=7)
    assert _rel(one, full) < TOL
    for world, window in ((2, 5), (3, 16), (4, 240)):
        segs = plan_segments(240, world, n_layers=3, mask=MASK)
        assert all(s.warm > MASK.n_global for s in segs[1:])  # the later segments really skip tokens
        many, _ = _stream_losses(model, ids, segs, window=window)
        assert _rel(many, one) < TOL, (world, window)


@pytest.mark.timeout(60)
def test_warm_up_is_exactly_the_receptive_field():
    """One warm-up token fewer than n_layers * (n_local - 1) changes the first scored token's loss:
    the bound in Note [streaming Λ evaluation] is tight, and the exactness test above can fail."""
    model, ids = _model(), _tokens(200)
    full = _full_losses(model, ids)
    a = 120
    reach = 3 * (MASK.n_local - 1)
    exact, _ = _stream_losses(model, ids, [Segment(start=a, stop=200, warm=a - reach)], window=9)
    short, _ = _stream_losses(model, ids, [Segment(start=a, stop=200, warm=a - reach + 1)], window=9)
    assert _rel(exact[a:], full[a:]) < TOL
    assert abs(short[a] - full[a]).item() > 1e3 * TOL * full.abs().max().item()
    assert _rel(short[a + 1:], full[a + 1:]) < TOL  # only the first scored token is out of reach


@pytest.mark.timeout(60)
def test_tolerance_separates_fp64_from_fp32():
    """The measured scale of TOL: fp32 streaming vs the fp64 full sequence is far above it."""
    m64, ids = _model(), _tokens(200)
    m32 = _model(torch.float32)
    full = _full_losses(m64, ids)
    s64, _ = _stream_losses(m64, ids, plan_segments(200, 2, n_layers=3, mask=MASK), window=11)
    s32, _ = _stream_losses(m32, ids, plan_segments(200, 2, n_layers=3, mask=MASK), window=11)
    assert _rel(s64, full) < 1e-13
    assert _rel(s32, full) > 1e3 * TOL


@pytest.mark.timeout(60)
def test_memory_is_constant_in_the_length():
    """Cached rows never exceed n_global + n_local between windows, nor n_global + n_local + window inside one."""
    model, ids = _model(), _tokens(240)
    for window in (4, 40):
        _, (attend,) = _stream_losses(model, ids, [Segment(start=0, stop=240, warm=0)], window=window)
        assert attend.rows() <= MASK.n_global + MASK.n_local
        assert attend.peak_rows == MASK.n_global + MASK.n_local + window
        assert all(c.index.tolist() == [0, 1, 2, *range(240 - 8, 240)] for c in attend.caches)


def test_plan_segments_cover_the_stream_once():
    segs = plan_segments(1000, 3, n_layers=2, mask=LambdaMask(n_global=4, n_local=100))
    assert [(s.start, s.stop) for s in segs] == [(0, 333), (333, 666), (666, 1000)]
    assert [s.warm for s in segs] == [0, 333 - 198, 666 - 198]
    # a warm-up that would reach the globals streams from the start instead
    assert plan_segments(100, 2, n_layers=2, mask=LambdaMask(n_global=4, n_local=30))[1].warm == 0


def test_baseline_weights_count_how_often_the_stream_scores_each_token():
    assert baseline_weights(10, 4, 2, 2).tolist() == [[3, 3], [2, 2]]  # 2 passes + tokens 0, 1 once more
    assert baseline_weights(3, 8, 2, 2).tolist() == [[1, 1], [1, 0]]  # shorter than one pass


def test_token_reader_reads_forward_and_skips():
    r = TokenReader(iter(range(100)))
    assert r.take(0, 3).tolist() == [0, 1, 2]
    assert r.take(2, 5).tolist() == [2, 3, 4]  # the previous read's last token may be read again
    assert r.take(50, 52).tolist() == [50, 51]
    with pytest.raises(ValueError, match="reads go forward"):
        r.take(10, 12)
    with pytest.raises(ValueError, match="ended at token 100"):
        r.take(98, 101)


def test_validation_stream_repeats_after_bos(tmp_path):
    from ringrt.data.tokenizer import load_tokenizer

    (tmp_path / "a.txt").write_text("training text")
    (tmp_path / "b.txt").write_text("abc")
    tok = load_tokenizer(None)
    stream, per_pass = validation_tokens(DataConfig(paths=[str(tmp_path)], val_percent=0.01), tok)  # val = [b.txt]
    one = [*"abc".encode(), tok.eos_id]
    assert per_pass == 4
    assert TokenReader(stream()).take(0, 9).tolist() == [tok.bos_id, *one, *one]


def test_bad_settings_name_the_setting():
    e = EvalConfig()
    check_stream_settings(e, 256, 2)  # defaults: no streaming, valid
    for bad, match in ((dict(stream_multiples=[0]), "eval.stream_multiples=\\[0\\] must be positive"),
                       (dict(stream_multiples=[True]), "eval.stream_multiples"),
                       (dict(stream_window=0), "eval.stream_window=0 must be a positive integer"),
                       (dict(stream_multiples=[1]), "cannot be split over 8 ranks")):
        with pytest.raises(ValueError, match=match):
            check_stream_settings(dataclasses.replace(e, **bad), 4 if "8 ranks" in match else 256, 8)


def _write_text(d) -> None:
    d.mkdir()
    (d / "a.txt").write_text("training text, never read")
    (d / "b.txt").write_text("def f(x):\n    return x + 1\n" * 40)  # 1080 tokens + <eos> per pass


def _ranks(rank, world, root):
    """Sub-cases of one spawn: streamed perplexity over the ranks, fp64, at two windows; then a bad
    setting raised on every rank before any communication."""
    from ringrt.data.tokenizer import load_tokenizer

    model, tok = _model(vocab=259), load_tokenizer(None)
    cfg = DataConfig(paths=[str(root)], val_percent=0.01)  # val = [b.txt]
    out = [stream_perplexity(model, cfg, tok, n=1500, train_len=16, mask=MASK, window=w, baseline=True, say=lambda *a: None)
           for w in (13, 64)]
    try:
        check_stream_settings(EvalConfig(stream_window=-1), 16, world)
        err = None
    except ValueError as e:
        err = str(e)
    return out, err


@pytest.mark.timeout(120)
def test_ranks_agree_with_one_process(tmp_path):
    _write_text(tmp_path / "text")  # once, before any process reads it
    ref, _ = _ranks(0, 1, tmp_path / "text")  # one process, the same model and text
    for world in (2, 3):
        res = run(_ranks, world, tmp_path / "text", timeout=100)
        for r in res:
            out, err = r
            assert err is not None and "eval.stream_window=-1" in err
            for got, want in zip(out, ref, strict=True):
                assert got["world"] == world and want["world"] == 1
                assert abs(got["perplexity"] - want["perplexity"]) < TOL * want["perplexity"]
                assert got["prefix_perplexity"].keys() == want["prefix_perplexity"].keys()
                for k, v in want["prefix_perplexity"].items():
                    assert math.isclose(got["prefix_perplexity"][k], v, rel_tol=TOL)
                assert math.isclose(got["baseline_1x"], want["baseline_1x"], rel_tol=TOL)
                assert got["baseline_1x_tokens"] == want["baseline_1x_tokens"]
                assert got["distinct_tokens_scored"] == 1081 and got["passes"] > 1
        assert out[0]["perplexity"] == pytest.approx(out[1]["perplexity"], rel=TOL)  # windows do not matter
