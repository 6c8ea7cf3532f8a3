"""Packed documents in training (``data.pack_documents``): the packer (boundaries, labels that never
cross a document, determinism, resume by skipping), the model on a packed batch (one process and
2 gloo ranks) against each document run on its own, and a short train run on 2 ranks."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ringrt.data.batching import train_batches
from ringrt.data.config import DataConfig
from ringrt.data.packing import IGNORE, PackedBatch, pack_rows, row_tensors, stack_rows
from ringrt.data.tokenizer import ByteTokenizer
from ringrt.model.config import AttentionConfig, ModelConfig
from tests.distributed import run

BOS, EOS = 256, 257
MODEL = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


def test_pack_rows_cuts_documents_and_ignores_cross_document_targets():
    docs = [list(b"abc") + [EOS], list(b"defghijk") + [EOS]]
    rows = [row_tensors(t, s) for t, s in pack_rows(docs, 8, BOS)]
    assert len(rows) == 2
    (t0, l0, cu0), (t1, l1, cu1) = rows
    assert t0.tolist() == [BOS, *b"abc", EOS, BOS, *b"de"] and cu0.tolist() == [0, 5, 7]
    assert l0.tolist() == [*b"abc", EOS, IGNORE, *b"de"]  # <eos> of "abc" does not predict "defg..."'s <bos>
    # the document cut at the row's end continues as a document of its own, with its own <bos>
    assert t1.tolist() == [BOS, *b"fghijk", EOS] and cu1.tolist() == [0, 7] and l1.tolist() == [*b"fghijk", EOS]
    # only the next <bos> fits: it fills the last (target-only) slot and the document starts in the next row
    rows = [row_tensors(t, s) for t, s in pack_rows([[1, 2, 3, 4, EOS], [5, 6, EOS]], 7, BOS)]
    assert rows[0][0].tolist() == [BOS, 1, 2, 3, 4, EOS, BOS] and rows[0][2].tolist() == [0, 6]
    assert rows[0][1].tolist() == [1, 2, 3, 4, EOS, IGNORE]
    # without <bos>: every token of every document once, in order (the last partial row dropped)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 50, (int(n),), generator=g).tolist() + [EOS] for n in torch.randint(0, 40, (30,), generator=g)]
    stream = [x for d in docs for x in d]
    rows = list(pack_rows(docs, 17, None))
    assert [x for t, _ in rows for x in t] == stream[: 17 * len(rows)]
    for tokens, segs in rows:
        t, labels, cu = row_tensors(tokens, segs)
        assert cu[0] == 0 and cu[-1] == 16 and bool((cu.diff() > 0).all())
        starts = set(torch.tensor(segs).cumsum(0)[:-1].tolist())
        assert set(cu[1:-1].tolist()) == starts - {16}
        for i in range(16):  # a label is ignored exactly where the next token starts another segment
            assert (labels[i] == IGNORE) == (i + 1 in starts), (i, segs)


def _corpus(tmp_path) -> str:
    g = torch.Generator().manual_seed(1)
    lines = [json.dumps({"text": "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(n),), generator=g))})
             for n in torch.randint(1, 90, (200,), generator=g)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "docs.jsonl")


def test_packed_batches_are_deterministic_resume_by_skip_and_never_cross_documents(tmp_path):
    cfg = DataConfig(paths=[_corpus(tmp_path)], seq_len=32, batch_size=3, val_percent=50.0, pack_documents=True)
    tok = ByteTokenizer()
    take = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
    first = take(train_batches(cfg, tok), 40)  # several epochs of this small corpus
    again = take(train_batches(cfg, tok), 40)
    resumed = take(train_batches(cfg, tok, skip=25), 15)
    for a in first:
        assert isinstance(a, PackedBatch) and a.tokens.shape == (3, 33) and a.labels.shape == (3, 32)
    same = lambda a, b: (torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)  # noqa: E731
                         and all(torch.equal(x, y) for x, y in zip(a.cu_seqlens, b.cu_seqlens, strict=True)))
    assert all(same(a, b) for a, b in zip(first, again, strict=True))
    assert all(same(a, b) for a, b in zip(first[25:], resumed, strict=True))
    assert not same(first[0], first[1])
    # two data-parallel replicas split each global batch of 6 rows
    halves = [take(train_batches(dataclasses.replace(cfg, batch_size=3), tok, replicas=2, replica=r), 2) for r in (0, 1)]
    six = take(train_batches(dataclasses.replace(cfg, batch_size=6), tok), 2)
    for j in range(2):
        assert torch.equal(torch.cat([halves[0][j].tokens, halves[1][j].tokens]), six[j].tokens)
    boundaries = 0
    for b in first:
        for t, labels, cu in zip(b.tokens, b.labels, b.cu_seqlens, strict=True):
            starts = set(cu[1:-1].tolist())
            boundaries += len(starts)
            assert all(t[s] == tok.bos_id for s in starts) and t[0] == tok.bos_id  # every segment starts with <bos>
            assert bool((labels[t[:-1] == tok.eos_id] == IGNORE).all())  # <eos> never predicts the next document
            scored = labels != IGNORE
            assert torch.equal(labels[scored], t[1:][scored])
            assert all(labels[s - 1] == IGNORE for s in starts)
    assert boundaries > 40
    # default off: the plain windows, as before
    plain = next(train_batches(dataclasses.replace(cfg, pack_documents=False), tok))
    assert isinstance(plain, torch.Tensor) and plain.shape == (3, 33)


def _packed_problem() -> PackedBatch:
    """Two rows of 24 inputs whose documents differ (one cut at the first row's end), vocab 64."""
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 64, (n,), generator=g).tolist() + [2] for n in (6, 12, 2, 17, 4, 9)]
    rows = [row_tensors(t, s) for t, s in pack_rows(docs, 25, 1)][:2]
    return stack_rows(rows)


def _model():
    from ringrt.model.llama import Llama

    torch.manual_seed(0)
    return Llama(dataclasses.replace(MODEL)).double()


def _per_document(batch: PackedBatch):
    """Each segment of each row run alone on one process: (per-token losses (B S,), loss, gradients)."""
    model = _model()
    ids, labels, cu = batch.packed()
    losses = []
    for a, b in zip(cu.tolist(), cu.tolist()[1:], strict=False):
        logits = model(ids[:, a:b])  # positions 0..L-1, plain causal attention
        losses.append(F.cross_entropy(logits[0], labels[0, a:b], ignore_index=IGNORE, reduction="none"))
    per_token = torch.cat(losses)
    loss = per_token.sum() / (labels != IGNORE).sum()
    loss.backward()
    return per_token.detach(), loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _packed_run(batch: PackedBatch, *, algorithm="tokenring", layout="zigzag", group=None):
    """The model on the packed batch as training runs it: (per-token losses (B S,), loss, gradients)."""
    import ringrt
    from ringrt.model.parallel import make_attend, sequence_loss, shard_batch, sum_gradients

    model = _model()
    attend = make_attend(AttentionConfig(algorithm=algorithm, layout=layout), model.config, train_len=24, group=group)
    sh = shard_batch(batch, layout=layout, group=group)
    logits = model(sh.input_ids, positions=sh.positions, attend=attend, cu_seqlens=sh.cu_seqlens)
    loss = sequence_loss(logits, sh.labels, group)
    loss.backward()
    sum_gradients(list(model.parameters()), group)
    per_token = F.cross_entropy(logits[0].detach(), sh.labels[0], ignore_index=IGNORE, reduction="none")
    if attend is not None:
        per_token = ringrt.unshard(per_token[None, :, None], layout=layout, cu_seqlens=sh.cu_seqlens)[0, :, 0]
    return per_token, loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _errors(got, want):
    (per_token, loss, grads), (ref_tokens, ref_loss, ref_grads) = got, want
    scale = max(g.abs().max().item() for g in ref_grads.values())
    return {"token": (per_token - ref_tokens).abs().max().item(), "loss": abs(loss - ref_loss),
            "grad": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads) / scale}


def test_packed_batch_on_one_process_matches_each_document_alone():
    batch = _packed_problem()
    assert [len(c) for c in batch.cu_seqlens] == [4, 4]  # 3 documents per row, different boundaries
    err = _errors(_packed_run(batch), _per_document(batch))
    assert err["token"] < 1e-6 and err["loss"] < 1e-6 and err["grad"] < 1e-6, err
    from ringrt.model.parallel import make_attend

    lam = make_attend(AttentionConfig(lambda_mask=True, n_global=2, n_local=8), MODEL, train_len=24)
    with pytest.raises(ValueError, match="does not take document boundaries"):
        _model()(torch.zeros(1, 4, dtype=torch.int64), attend=lam, cu_seqlens=torch.tensor([0, 4]))
    from ringrt.jobs.config import TrainJobConfig
    from ringrt.jobs.train import validate

    validate(TrainJobConfig(data=DataConfig(seq_len=30, pack_documents=True)), 2)  # any length: documents are padded
    with pytest.raises(ValueError, match="data.pack_documents=true cannot be used with attention.lambda_mask=true"):
        validate(TrainJobConfig(data=DataConfig(pack_documents=True), attention=AttentionConfig(lambda_mask=True)), 2)


def _parity_worker(rank, world, batch):
    out = {}
    for algorithm, layout in (("tokenring", "zigzag"), ("ring", "contiguous")):
        out[algorithm] = _packed_run(batch, algorithm=algorithm, layout=layout, group=torch.distributed.group.WORLD)
    return out


@pytest.mark.timeout(120)
def test_packed_batch_on_two_ranks_matches_each_document_alone():
    batch = _packed_problem()
    want = _per_document(batch)
    res = run(_parity_worker, 2, batch)
    for rank in range(2):
        for algorithm in ("tokenring", "ring"):
            err = _errors(res[rank][algorithm], want)
            print(f"rank {rank} {algorithm}: {err}")
            assert err["token"] < 1e-6 and err["loss"] < 1e-6 and err["grad"] < 1e-6, (rank, algorithm, err)


def _train_worker(rank, world, root, corpus):
    from ringrt.jobs.config import TrainConfig, TrainJobConfig
    from ringrt.jobs.train import run_train

    data = DataConfig(paths=[corpus], seq_len=30, batch_size=2, val_percent=50.0, pack_documents=True)  # 30: any length
    t = TrainConfig(steps=6, lr=3e-3, warmup_steps=1, ckpt_every=3, log_every=3, out_dir=f"{root}/a", progress=False)
    a = run_train(TrainJobConfig(model=ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2), data=data, train=t))
    return {"losses": a["losses"]}


@pytest.mark.timeout(120)
def test_train_with_packed_documents_on_two_ranks(tmp_path):
    res = run(_train_worker, 2, str(tmp_path), _corpus(tmp_path))
    losses = res[0]["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    assert losses[0] > 4.5 and losses[-1] < losses[0], losses  # from ~ln(259)
    assert res[1]["losses"] == losses
