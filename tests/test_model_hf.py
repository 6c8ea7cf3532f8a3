"""The model against Hugging Face ``transformers`` (an independent implementation): logits, loss and
gradients of a training step, on one process and sharded over W = 2, 4 gloo ranks.

Reference: ``LlamaForCausalLM`` built by ``transformers`` from a random init and written with its
own ``save_pretrained``; ringrt reads that directory with ``ringrt.load_pretrained``. Everything runs
in fp64, where both sides agree to ~1e-15 relative (measured: max |Δlogit| ≈ 1e-15, |Δgrad| ≈ 1e-16);
tolerances of 1e-10 leave room for summation order only. The fp32 case uses the flash-attention rule:
ringrt's fp32 error against the fp64 reference is at most 2x the error of HF's own fp32 run.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run

transformers = pytest.importorskip("transformers")

B, S = 2, 32  # S divisible by 2W for W = 1, 2, 4 (zigzag)


def _hf_dir(tmp_path, name, **kw):
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        rms_norm_eps=1e-6, max_position_embeddings=256, **kw,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / name
    model.save_pretrained(path)
    return str(path)


def _hf_reference(path, tokens, labels, dtype):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(dtype)
    out = model(input_ids=tokens[:, :-1])
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), ignore_index=-100)
    loss.backward()
    grads = {n.removeprefix("model."): p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _ringrt_step(rank, world, path, tokens, labels_full, layout, dtype):
    from ringrt.ops.layout import shard_of
    from ringrt.model.hf import load_pretrained
    from ringrt.model.parallel import RingAttend, sequence_loss, shard_batch, sum_gradients

    model = load_pretrained(path, dtype=dtype).train()
    group = None
    sh = shard_batch(tokens, layout=layout, group=group)
    labels = shard_of(labels_full, layout, rank, world, dim=1)
    attend = RingAttend(algorithm="tokenring", layout=layout, group=group) if world > 1 else None
    logits = model(sh.input_ids, positions=sh.positions, attend=attend)
    loss = sequence_loss(logits, labels, group)
    loss.backward()
    sum_gradients(list(model.parameters()), group)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _worker(rank, world, cases):
    from ringrt.ops.layout import shard_of

    errors = []
    for (path, tokens, labels, layout, dtype, ref) in cases:
        logits, loss, grads = _ringrt_step(rank, world, path, tokens, labels, layout, dtype)
        ref_logits, ref_loss, ref_grads = ref
        errors.append((
            (logits.double() - shard_of(ref_logits, layout, rank, world, dim=1).double()).abs().max().item(),
            abs(loss.item() - ref_loss.item()),
            max((grads[n].double() - g.double()).abs().max().item() for n, g in ref_grads.items()),
            sorted(grads) == sorted(ref_grads),
        ))
    return errors


def _cases(tmp_path, dtype):
    torch.manual_seed(1)
    tokens = torch.randint(0, 97, (B, S + 1))
    labels = tokens[:, 1:].clone()
    labels[0, 3:20] = -100  # uneven scored-token counts per shard: the loss must be the GLOBAL mean
    gqa = _hf_dir(tmp_path, "gqa", num_key_value_heads=2, rope_theta=500.0, tie_word_embeddings=False)
    tied = _hf_dir(tmp_path, "tied", num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=True)
    out = []
    for path in (gqa, tied):
        ref = _hf_reference(path, tokens, labels, dtype)
        for layout in ("zigzag", "contiguous"):
            out.append((path, tokens, labels, layout, dtype, ref))
    return out


@pytest.mark.timeout(240)
def test_hf_parity_fp64_one_process(tmp_path):
    for errs in [_worker(0, 1, _cases(tmp_path, torch.float64))]:
        for logit_err, loss_err, grad_err, same_names in errs:
            assert same_names
            assert logit_err < 1e-10 and loss_err < 1e-12 and grad_err < 1e-10, (logit_err, loss_err, grad_err)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_hf_parity_fp64_sharded(tmp_path, world):
    results = run(_worker, world, _cases(tmp_path, torch.float64))
    for errs in results:
        for logit_err, loss_err, grad_err, same_names in errs:
            assert same_names
            assert logit_err < 1e-10 and loss_err < 1e-12 and grad_err < 1e-10, (logit_err, loss_err, grad_err)


@pytest.mark.timeout(240)
def test_hf_parity_fp32_sharded_within_2x_of_hf_fp32(tmp_path):
    cases64 = _cases(tmp_path, torch.float64)
    cases32 = [(p, t, l, lay, torch.float32, ref64) for (p, t, l, lay, _, ref64) in cases64]
    hf32 = [_hf_reference(p, t, l, torch.float32) for (p, t, l, lay, _, _) in cases64]
    results = run(_worker, 2, cases32)
    for i, ((ref_logits, _, ref_grads), h32) in enumerate(zip([c[5] for c in cases64], hf32, strict=True)):
        hf_logit = (h32[0].double() - ref_logits).abs().max().item()
        hf_grad = max((h32[2][n].double() - g).abs().max().item() for n, g in ref_grads.items())
        for errs in results:
            logit_err, _, grad_err, _ = errs[i]
            assert logit_err <= 2 * hf_logit, (logit_err, hf_logit)
            assert grad_err <= 2 * hf_grad, (grad_err, hf_grad)
