"""Packed documents through ``ringrt.hf``: parity with each document run on its own.

A batch of 3 documents of odd lengths (7, 5, 11: none a multiple of 2W = 4, so every document is
padded in its shards) packed into one row by ``transformers.DataCollatorWithFlattening``, cut by
``ringrt.hf.shard_inputs`` over W = 2 gloo ranks, through a tiny random Llama and Qwen2 (q/k/v
biases, no sliding window) patched with ``ringrt.hf.patch``. Reference: the same unpatched model
(sdpa, fp64) on one process, each document run separately; loss = summed cross-entropy over all
documents / scored tokens. fp64: logits, loss and gradients agree to ~1e-16 relative (measured;
summation order only), asserted at 1e-10.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run
from tests.test_hf_backend import _caught
from tests.test_hf_backend import make_model as _tiny_model

transformers = pytest.importorskip("transformers")

DOCS = (7, 5, 11)
V = 97


def make_model(kind: str, dtype=torch.float64, sliding: bool = False):
    """test_hf_backend's tiny random Llama or Qwen2 (q/k/v biases; no sliding window unless ``sliding``), 2 layers."""
    return _tiny_model(kind, dtype, sliding=sliding, layers=2)


def _documents():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (n,), generator=g) for n in DOCS]


def _packed_batch():
    """What a Trainer with DataCollatorWithFlattening feeds: input_ids, labels, position_ids (1, S)."""
    collator = transformers.DataCollatorWithFlattening(return_position_ids=True)
    batch = collator([{"input_ids": d.tolist()} for d in _documents()], return_tensors="pt")
    batch["labels"][0, 9] = -100  # an unscored token inside document 1
    return {k: batch[k] for k in ("input_ids", "labels", "position_ids")}


def _reference(kind: str):
    """Each document through the unpatched model on its own: (logits (1, S, V), loss, grads)."""
    model = make_model(kind)
    model.set_attn_implementation("sdpa")
    labels = _packed_batch()["labels"][0]
    total, count, logits, start = 0.0, 0, [], 0
    for doc in _documents():
        out = model(input_ids=doc[None], use_cache=False).logits
        target = labels[start + 1: start + len(doc)]
        total = total + torch.nn.functional.cross_entropy(out[0, :-1], target, ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
        logits.append(out.detach())
        start += len(doc)
    loss = total / count
    loss.backward()
    return torch.cat(logits, dim=1), loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _errors(got, ref):
    """max |Δ| / max |ref| of logits, loss, and the worst parameter gradient."""
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()  # noqa: E731
    return rel(got[0], ref[0]), rel(got[1], ref[1]), max(rel(got[2][n], ref[2][n]) for n in ref[2])


def _packed_step(kind: str, algorithm: str):
    import ringrt
    import ringrt.hf

    model = make_model(kind)
    sp = ringrt.hf.patch(model, algorithm=algorithm)
    inputs = ringrt.hf.shard_inputs(_packed_batch(), layout=sp.layout)
    out = model(**inputs, use_cache=False)  # the boundaries reach the attention as cu_seq_lens_q/k
    loss = ringrt.hf.sequence_loss(out.logits, inputs["shift_labels"])
    loss.backward()
    ringrt.hf.sum_gradients(model.parameters())
    share = out.loss.detach().double()  # transformers' own loss: this rank's share (fp32)
    torch.distributed.all_reduce(share)
    full = ringrt.unshard(out.logits.detach().contiguous(), layout=sp.layout, cu_seqlens=inputs["cu_seq_lens_q"])
    return (full, loss.detach(), {n: p.grad.detach() for n, p in model.named_parameters()}), share.item()


def _parity_worker(rank, world, cases):
    refs, out = {}, {}
    for kind, algorithm in cases:
        if kind not in refs:
            refs[kind] = _reference(kind)
        got, share = _packed_step(kind, algorithm)
        out[kind, algorithm] = (*_errors(got, refs[kind]), abs(share - refs[kind][1].item()))
    return out


@pytest.mark.timeout(200)
def test_packed_parity_with_separate_documents():
    cases = [("llama", alg) for alg in ("tokenring", "ring", "allgather", "ulysses", "hybrid")] + [("qwen2", "tokenring")]
    results = run(_parity_worker, 2, cases, timeout=180)
    for key, errs in results[0].items():
        assert all(r[key] == errs for r in results), key  # every rank gathered the same logits and grads
        logits, loss, grads, share = errs
        assert max(logits, loss, grads) <= 1e-10, (key, errs)
        assert share <= 1e-6, (key, errs)  # transformers' own loss runs in fp32
    print(results[0])


def _refusal_worker(rank, world):
    import ringrt
    import ringrt.hf
    from ringrt.lm_infinite import LambdaMask
    from ringrt.ops.layout import positions as layout_positions

    res = {}
    model = make_model("llama")
    sp = ringrt.hf.patch(model)
    inputs = ringrt.hf.shard_inputs(_packed_batch(), layout=sp.layout)
    base = {"input_ids": inputs["input_ids"], "use_cache": False}
    cu = inputs["cu_seq_lens_q"]
    plain = layout_positions(sp.layout, rank, world, inputs["input_ids"].shape[1])[None]  # not per document
    res["plain_positions"] = _caught(lambda: model(**base, position_ids=plain, cu_seq_lens_q=cu, cu_seq_lens_k=cu))
    other = torch.tensor([0, 12, 23], dtype=torch.int32)
    res["q_ne_k"] = _caught(lambda: model(**base, position_ids=inputs["position_ids"], cu_seq_lens_q=cu, cu_seq_lens_k=other))
    res["q_only"] = _caught(lambda: model(**base, position_ids=inputs["position_ids"], cu_seq_lens_q=cu))
    one_rank = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu} if rank == 0 else {}  # rank 1 forgets the boundaries
    res["one_rank"] = _caught(lambda: model(**base, position_ids=inputs["position_ids"], **one_rank))
    # after the refusals, a valid step runs (no collective left half-done)
    logits = model(**inputs, use_cache=False).logits
    full = ringrt.unshard(logits.detach().contiguous(), layout=sp.layout, cu_seqlens=cu)
    single = make_model("llama")
    single.set_attn_implementation("sdpa")
    res["after"] = (full[:, :7] - single(input_ids=_documents()[0][None], use_cache=False).logits.detach()).abs().max().item()
    # windows take no document boundaries: Qwen2's sliding-window layers, a Λ-mask
    windowed = make_model("qwen2", sliding=True)
    sp = ringrt.hf.patch(windowed)
    inputs = ringrt.hf.shard_inputs(_packed_batch(), layout=sp.layout)
    res["sliding"] = _caught(lambda: windowed(**inputs, use_cache=False))
    lam = make_model("llama")
    sp = ringrt.hf.patch(lam, lambda_mask=LambdaMask(n_global=0, n_local=4))
    inputs = ringrt.hf.shard_inputs(_packed_batch(), layout=sp.layout)
    res["lambda"] = _caught(lambda: lam(**inputs, use_cache=False))
    return res


@pytest.mark.timeout(120)
def test_packed_refusals():
    results = run(_refusal_worker, 2, timeout=100)
    for key, want in [("plain_positions", "in-document positions for cu_seq_lens_q"), ("q_ne_k", "cu_seq_lens_q != cu_seq_lens_k"),
                      ("q_only", "cu_seq_lens_q is given but cu_seq_lens_k is not"), ("one_rank", "ringrt.hf attention"),
                      ("sliding", "cannot be used with sliding-window layers (sliding_window=5)"),
                      ("lambda", "cannot be used with a lambda_mask")]:
        for r in results:
            assert want in r[key], (key, r[key])
    for r in results:
        assert r["after"] <= 1e-12, r


def test_shard_inputs_packed_single_process():
    import ringrt
    import ringrt.hf

    batch = _packed_batch()
    got = ringrt.hf.shard_inputs(batch, layout="zigzag")  # one process: 2 chunks per document
    cu = [0, 7, 12, 23]
    assert got["cu_seq_lens_q"].tolist() == cu and got["cu_seq_lens_k"] is got["cu_seq_lens_q"]
    assert got["cu_seq_lens_q"].dtype == torch.int32 and got["max_length_q"] == got["max_length_k"] == 11
    assert got["position_ids"].tolist() == [[*range(8), *range(6), *range(12)]]  # each document padded to a multiple of 2
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    want_ids, want_labels = [], []
    for a, b in zip(cu, cu[1:], strict=False):
        n = b - a + (b - a) % 2
        want_ids += ids[a:b] + [0] * (n - (b - a))
        want_labels += labels[a + 1: b] + [-100] * (n - (b - a) + 1)  # the document's last token predicts nothing
    assert got["input_ids"][0].tolist() == want_ids and got["shift_labels"][0].tolist() == want_labels
    assert int(got["num_items_in_batch"]) == 23 - 3 - 1
    # the same from an explicit cu_seqlens (no position_ids), and from the collator's flash kwargs
    explicit = ringrt.hf.shard_inputs({"input_ids": batch["input_ids"], "labels": batch["labels"]}, cu_seqlens=torch.tensor(cu))
    flash = ringrt.hf.shard_inputs({"input_ids": batch["input_ids"], "labels": batch["labels"], "cu_seq_lens_q": torch.tensor(cu)})
    for other in (explicit, flash):
        assert all(torch.equal(torch.as_tensor(other[k]), torch.as_tensor(got[k])) for k in got), other
    ids2 = batch["input_ids"].expand(2, -1)
    with pytest.raises(ValueError, match=r"packed documents need a batch of one row"):
        ringrt.hf.shard_inputs({"input_ids": ids2}, cu_seqlens=torch.tensor(cu))
    with pytest.raises(ValueError, match=r"position_ids.*restart at 0 inside a row"):
        ringrt.hf.shard_inputs({"input_ids": ids2, "position_ids": batch["position_ids"].expand(2, -1)})
    with pytest.raises(ValueError, match=r"cu_seqlens ends at 20 but batch\['input_ids'\] holds 23 tokens"):
        ringrt.hf.shard_inputs({"input_ids": batch["input_ids"]}, cu_seqlens=torch.tensor([0, 7, 20]))
    with pytest.raises(ValueError, match=r"do not restart at 0 at the documents of cu_seqlens"):
        ringrt.hf.shard_inputs(batch, cu_seqlens=torch.tensor([0, 12, 23]))
    with pytest.raises(ValueError, match=r"position_ids\[3\]=5"):
        ringrt.hf.shard_inputs({"input_ids": batch["input_ids"][:, :5], "position_ids": torch.tensor([[0, 1, 2, 5, 0]])})
    with pytest.raises(ValueError, match=r"attention_mask'\] must be all ones"):
        ringrt.hf.shard_inputs({**batch, "attention_mask": torch.ones_like(batch["input_ids"]).index_fill_(1, torch.tensor([22]), 0)})
    # whole sequences (positions 0..S-1, or none) keep the plain path
    plain = ringrt.hf.shard_inputs({"input_ids": batch["input_ids"], "position_ids": torch.arange(23)[None]})
    assert "cu_seq_lens_q" not in plain and plain["position_ids"].tolist() == [list(range(24))]


@pytest.mark.timeout(150)
def test_finetune_packed_on_two_ranks():
    """launch/hf_finetune.py --pack: the first step matches each document run on its own, the loss falls."""
    import re
    import shutil

    from tests.launch_util import REPO, run as launch

    cmd = [shutil.which("torchrun"), "--standalone", "--nproc-per-node=2", str(REPO / "launch" / "hf_finetune.py"),
           "--pack", "--steps", "4", "--seq-len", "256", "--check"]
    p = launch(cmd, timeout=140)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"step 1: [2-9] packed documents", p.stdout), p.stdout
    m = re.search(r"sequence-parallel loss ([\d.]+); one-process loss ([\d.]+); worst relative gradient difference ([\d.e+-]+)", p.stdout)
    assert m, p.stdout
    assert abs(float(m[1]) - float(m[2])) <= 1e-5 and float(m[3]) <= 1e-4, m.group(0)  # fp32, measured ~1e-6
    losses = [float(x) for x in re.findall(r"step +\d+  loss ([\d.]+)", p.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
