"""Memory that scales like the math: per-layer checkpointing and the chunked LM head + loss give the
plain path's loss and gradients (one process and 2 gloo ranks, fp64 and fp32 with a measured
tolerance), and the analytic count of ``ringrt.model.memory`` matches a measured peak."""

from __future__ import annotations

import pytest
import torch

from ringrt.distributed.spawn import run_local
from ringrt.lm_infinite import LambdaMask
from ringrt.model import llama
from ringrt.model.config import ModelConfig
from ringrt.model.llama import Llama
from ringrt.model.loss import chunked_cross_entropy
from ringrt.model.parallel import LambdaAttend, RingAttend, chunked_sequence_loss, sequence_loss, shard_batch, sum_gradients
from tests.distributed import run

CFG = ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64)
MASK = LambdaMask(n_global=2, n_local=8)
N = 48  # tokens of the test sequence
SLICE = 5  # MLP slice under checkpointing: slices of unequal length


def _tokens(n: int = N) -> torch.Tensor:
    t = torch.randint(0, CFG.vocab_size, (1, n + 1), generator=torch.Generator().manual_seed(7))
    t[0, 3] = t[0, 20] = -100  # two labels (t[:, 1:]) not scored: ids are clamped below
    return t


def _model(dtype) -> Llama:
    torch.manual_seed(0)
    return Llama(CFG).to(dtype)


def _ids(sh):
    return sh.input_ids.clamp_min(0)


def _plain(model, sh, attend, group=None):
    logits = model(_ids(sh), positions=sh.positions, attend=attend)
    return sequence_loss(logits, sh.labels, group)


def _lean(model, sh, attend, group=None, chunk=7):
    hidden = model(_ids(sh), positions=sh.positions, attend=attend, hidden_only=True, checkpoint=True)
    return chunked_sequence_loss(hidden, model.lm_head.weight, sh.labels, group, chunk=chunk)


def _loss_and_grads(path, model, sh, attend, group=None) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = path(model, sh, attend, group)
    loss.backward()
    sum_gradients(list(model.parameters()), group)
    return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def _attend(kind: str, group=None):
    if kind == "lambda":
        return LambdaAttend(mask=MASK, rope_theta=CFG.rope_theta, group=group)
    return None if group is None else RingAttend(algorithm="tokenring", layout="zigzag", group=group)


def _layout(kind: str) -> str:
    return "contiguous" if kind == "lambda" else "zigzag"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture()
def small_slices(monkeypatch):
    monkeypatch.setattr(llama, "MLP_SLICE", SLICE)


def test_chunked_cross_entropy_matches_full_logits():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(13, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(259, 16, dtype=torch.float64, generator=g, requires_grad=True)
    lab = torch.randint(0, 259, (13,), generator=g)
    lab[[2, 9]] = -100
    ref = torch.nn.functional.cross_entropy(h @ w.t(), lab, ignore_index=-100, reduction="sum")
    dh, dw = torch.autograd.grad(ref * 1.7, (h, w))
    for chunk in (1, 4, 13, 100):
        got = chunked_cross_entropy(h, w, lab, chunk=chunk)
        gh, gw = torch.autograd.grad(got * 1.7, (h, w))
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
        torch.testing.assert_close(gh, dh, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gw, dw, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="chunk=0"):
        chunked_cross_entropy(h, w, lab, chunk=0)


@pytest.mark.parametrize("kind", ["lambda", "dense"])
def test_checkpointed_chunked_equals_plain_one_process(kind, small_slices):
    """fp64: equal to rounding. fp32: the lean path's error against the fp64 plain path is at most
    2x the plain fp32 path's own error (the same-precision reference), per the style's rule."""
    sh = shard_batch(_tokens(), layout="contiguous")
    ref_loss, ref = _loss_and_grads(_plain, _model(torch.float64), sh, _attend(kind))
    loss, got = _loss_and_grads(_lean, _model(torch.float64), sh, _attend(kind))
    assert abs(loss - ref_loss) <= 1e-13 * abs(ref_loss)
    assert _rel(got, ref) < 1e-12
    _, plain32 = _loss_and_grads(_plain, _model(torch.float32), sh, _attend(kind))
    loss32, lean32 = _loss_and_grads(_lean, _model(torch.float32), sh, _attend(kind))
    assert abs(loss32 - ref_loss) <= 1e-6 * abs(ref_loss)
    assert _rel(lean32, ref) <= 2 * _rel(plain32, ref)


def test_checkpointed_chunked_under_bf16_autocast_is_as_close_as_the_plain_path(small_slices):
    """train.precision=bf16 runs the model under bf16 autocast: the lean path's loss and gradients are
    no further from the fp64 plain path than the plain path's own under the same autocast (2x rule)."""
    sh = shard_batch(_tokens(), layout="contiguous")
    ref_loss, ref = _loss_and_grads(_plain, _model(torch.float64), sh, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain = _loss_and_grads(_plain, _model(torch.float32), sh, None)
        lean_loss, lean = _loss_and_grads(_lean, _model(torch.float32), sh, None)
    assert abs(plain_loss - ref_loss) > 0 and _rel(plain, ref) > 1e-4  # bf16 really ran
    assert abs(lean_loss - ref_loss) <= 2 * abs(plain_loss - ref_loss)
    assert _rel(lean, ref) <= 2 * _rel(plain, ref)


def _ranks(rank, world, ref):
    """Every sub-case in one spawn: each attention's lean path (checkpointing + chunked loss) in fp64
    against the one-process plain reference computed by the parent."""
    llama.MLP_SLICE = SLICE
    out = {}
    for kind in ("lambda", "dense"):
        sh = shard_batch(_tokens(), layout=_layout(kind))
        loss, grads = _loss_and_grads(_lean, _model(torch.float64), sh, _attend(kind, torch.distributed.group.WORLD),
                                      torch.distributed.group.WORLD)
        out[kind] = (abs(loss - ref[kind][0]) / abs(ref[kind][0]), _rel(grads, ref[kind][1]))
    return out


@pytest.mark.timeout(120)
def test_checkpointed_chunked_equals_plain_two_ranks(small_slices):
    ref = {}
    for kind in ("lambda", "dense"):
        sh = shard_batch(_tokens(), layout="contiguous")
        ref[kind] = _loss_and_grads(_plain, _model(torch.float64), sh, _attend(kind))
    for rank_result in run(_ranks, 2, ref, timeout=90):
        for kind, (dloss, dgrad) in rank_result.items():
            assert dloss < 1e-13, kind
            assert dgrad < 1e-12, kind


@pytest.mark.timeout(120)
def test_formula_matches_measured_peak():
    """The demo model, 16K tokens on one process, checkpointing + chunked loss: the peak RSS the
    pass adds (a fresh process, glibc's mmap threshold fixed) is within 1.5x of the analytic count."""
    from ringrt.bench.scale import _point, demo_model_config
    from ringrt.model.memory import activation_bytes_per_token

    mc = demo_model_config()
    n = 16384
    cfg = {"model": {f: getattr(mc, f) for f in ModelConfig.__slots__}, "checkpoint": None, "tokens": n, "attention": "lambda",
           "n_global": 8, "n_local": 256, "checkpointing": True, "loss_chunk": 4096, "timing_pass": "none"}
    (r,) = run_local(_point, 1, cfg, timeout=100)
    measured = (r["peak_kib"] - r["base_kib"]) * 1024
    formula = activation_bytes_per_token(mc, checkpointing=True, loss_chunk=4096, tokens_per_rank=n) * n
    assert 1 / 1.5 <= measured / formula <= 1.5, (measured, formula)


def test_train_settings_pick_the_lean_path():
    """``train.activation_checkpointing`` / ``train.loss_chunk`` reach the training step's loss (same
    value and gradients as the defaults), and bad values are named."""
    from ringrt.jobs.config import TrainConfig
    from ringrt.jobs.train import _validate_memory, micro_loss

    from dataclasses import replace

    sh = shard_batch(_tokens(), layout="contiguous")
    sh = replace(sh, input_ids=_ids(sh))
    res = []
    for t in (TrainConfig(), TrainConfig(activation_checkpointing="layers", loss_chunk=5)):
        model = _model(torch.float64)
        loss = micro_loss(model, sh, t=t, attend=_attend("lambda"), seq_group=None)
        loss.backward()
        res.append((float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    assert abs(res[0][0] - res[1][0]) <= 1e-13 * abs(res[0][0])
    assert _rel(res[1][1], res[0][1]) < 1e-12
    with pytest.raises(ValueError, match="train.activation_checkpointing='all'"):
        _validate_memory(TrainConfig(activation_checkpointing="all"))
    with pytest.raises(ValueError, match="train.loss_chunk=-1"):
        _validate_memory(TrainConfig(loss_chunk=-1))
