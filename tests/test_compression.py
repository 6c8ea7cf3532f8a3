"""Extensible Tokenization on one process: the strided selection against explicit index lists,
chunk independence, the packed two-stream loss against the naive per-chunk loss (fp64), frozen-LLM
gradients, the offline cache against encoding afresh, online sessions, the train/eval jobs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ringrt.compression import CompressionConfig, CompressionSession, EmbeddingCache, ExtensibleEmbedder, choose_k, compressed_len, downscale, encode_chunks, load_embedder, naive_two_stream_loss, packed_two_stream_loss, select_indices
from ringrt.compression.packing import freeze, packed_layout
from ringrt.model.config import ModelConfig
from ringrt.model.llama import Llama

CFG = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2)


def _models(dtype=torch.float64, layers=2):
    torch.manual_seed(0)
    llm = freeze(Llama(CFG)).to(dtype)
    return llm, ExtensibleEmbedder(llm, layers).to(dtype)


def test_selection_explicit_indices():
    assert select_indices(8, 2).tolist() == [1, 3, 5, 7]
    assert select_indices(8, 4).tolist() == [3, 7]
    assert select_indices(8, 3).tolist() == [2, 5, 7]  # 7 closes the partial group 6..7
    assert select_indices(64, 16).tolist() == [15, 31, 47, 63]
    assert select_indices(64, 32).tolist() == [31, 63]
    assert select_indices(5, 8).tolist() == [4]
    assert select_indices(6, 1).tolist() == [0, 1, 2, 3, 4, 5]
    for c in (64, 48, 100, 512, 7):
        for k in (2, 4, 8, 16):
            assert set(select_indices(c, 2 * k).tolist()) <= set(select_indices(c, k).tolist()), (c, k)
    assert set(select_indices(512, 32).tolist()) == {31 + 32 * j for j in range(16)}
    # several chunks: chunk lengths [8, 5], k = 4 -> indices 3, 7 | 8+3, 8+4 (partial group closed)
    x = torch.arange(13, dtype=torch.float64).view(1, 13, 1)
    assert downscale(x, 4, [8, 5]).flatten().tolist() == [3, 7, 11, 12]
    assert compressed_len(13, 8, 4) == 4 and compressed_len(4096, 512, 32) == 128
    # smallest k whose compressed context + raw tail fit: 1000 ctx tokens in chunks of 100, 60 raw, window 200
    assert choose_k(1000, 60, window=200, chunk_len=100, ks=[2, 4, 8, 16]) == 8  # 10·13 + 60 = 190 (k=4: 310)
    with pytest.raises(ValueError, match="compression.ks"):
        choose_k(10_000, 60, window=100, chunk_len=100, ks=[2, 4])
    with pytest.raises(ValueError, match="compression.k=0"):
        select_indices(8, 0)


def test_chunks_are_independent():
    _, emb = _models()
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 5 * 16 + 7))  # 5 full chunks of 16 and a partial one of 7
    base = encode_chunks(emb, ids, 16)
    lengths = [16] * 5 + [7]
    for j in (0, 3, 5):
        changed = ids.clone()
        lo = 16 * j
        changed[:, lo : lo + lengths[j]] = torch.randint(0, 256, (2, lengths[j]))
        out = encode_chunks(emb, changed, 16)
        for i in range(6):
            a, b = base[:, 16 * i : 16 * i + lengths[i]], out[:, 16 * i : 16 * i + lengths[i]]
            if i == j:
                assert not torch.allclose(a, b)
            else:
                assert torch.equal(a, b), (i, j)
        for k in (2, 8, 32):
            ca, cb = downscale(base, k, lengths), downscale(out, k, lengths)
            per = [-(-c // k) for c in lengths]
            lo_c = sum(per[:j])
            keep = torch.ones(ca.shape[1], dtype=torch.bool)
            keep[lo_c : lo_c + per[j]] = False
            assert torch.equal(ca[:, keep], cb[:, keep])
    # each chunk alone, at positions 0..c-1, is what encode_chunks gives for it
    assert torch.allclose(emb(ids[:, 32:48]), base[:, 32:48], atol=1e-12, rtol=0)


def test_packed_mask_matches_picture():
    lay = packed_layout(3, 3, 2)  # the picture in packing.py: m = 2, segments of 2 tokens
    picture = ["1.......", "11......", "111.....", "1111....", "11..1...", "11..11..", "1111..1.", "1111..11"]
    assert ["".join("1" if v else "." for v in row) for row in lay.mask.tolist()] == picture
    assert lay.positions.tolist() == [0, 1, 2, 3, 2, 3, 4, 5] and lay.comp_rows.tolist() == [1, 3]


@pytest.mark.timeout(120)
def test_packed_loss_equals_naive_and_llm_gets_no_gradient():
    llm, emb = _models()
    torch.manual_seed(2)
    tokens = torch.randint(0, 256, (2, 5 * 12))  # 5 chunks of 12
    for k in (2, 3, 4, 12, 32):  # 3 leaves a partial group, 32 > chunk_len: one embedding per chunk
        emb.zero_grad(set_to_none=True)
        s_naive, n_naive = naive_two_stream_loss(llm, emb, tokens, chunk_len=12, k=k)
        (s_naive / n_naive).backward()
        g_naive = [p.grad.clone() for p in emb.parameters()]
        emb.zero_grad(set_to_none=True)
        s_packed, n_packed = packed_two_stream_loss(llm, emb, tokens, chunk_len=12, k=k)
        (s_packed / n_packed).backward()
        assert n_naive == n_packed == 2 * 4 * 12
        # fp64 throughout: both orders of summation agree to rounding (measured ~1e-13 relative)
        assert torch.allclose(s_packed, s_naive, rtol=1e-11, atol=0), (k, s_packed.item(), s_naive.item())
        # RMSNorm normalises in fp32 even for fp64 inputs (llama.py), so gradients carry fp32 rounding:
        # measured max |packed - naive| <= 5e-8 x max |grad| per tensor; allowed 1e-6 x
        for gp, gn in zip((p.grad for p in emb.parameters()), g_naive, strict=True):
            assert (gp - gn).abs().max() <= 1e-6 * gn.abs().max(), (k, (gp - gn).abs().max())
        assert all(p.grad is None for p in llm.parameters())  # frozen: nothing reaches the LLM
        assert sum(p.grad.abs().sum() for p in emb.parameters()) > 0
        # the last embedder block's MLP receives gradient only through compressed embeddings
        assert emb.layers[-1].mlp.down_proj.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="chunk_len"):
        packed_two_stream_loss(llm, emb, tokens[:, :30], chunk_len=12, k=2)


def test_offline_cache_equals_fresh_encoding(tmp_path):
    _, emb = _models(torch.float32)
    torch.manual_seed(3)
    ctx = torch.randint(0, 256, (1, 4 * 16 + 10))
    lengths = [16] * 4 + [10]
    # the independent reference: every chunk encoded alone, explicit index lists
    fresh = [emb(ctx[:, 16 * i : 16 * i + c]) for i, c in enumerate(lengths)]
    for base_k in (1, 2):
        built = EmbeddingCache.build(emb, ctx, chunk_len=16, base_k=base_k)
        built.save(tmp_path / f"c{base_k}.safetensors")
        cache = EmbeddingCache.load(tmp_path / f"c{base_k}.safetensors", context=ctx)
        for k in (2, 4, 8, 16, 32):
            ref = torch.cat([f[:, select_indices(c, k)] for f, c in zip(fresh, lengths, strict=True)], dim=1)
            got = cache.compressed(k)
            assert got.shape == ref.shape == (1, compressed_len(74, 16, k), CFG.dim)
            assert torch.allclose(got, ref, atol=1e-6, rtol=0), (base_k, k)  # same math, other batching
        assert cache.choose_k(20, window=40, ks=[2, 4, 8]) == 4  # k=2: 37 + 20 > 40; k=4: 19 + 20 <= 40
    with pytest.raises(ValueError, match="base_k=2"):
        cache.compressed(3)
    with pytest.raises(ValueError, match="another context"):
        EmbeddingCache.load(tmp_path / "c2.safetensors", context=ctx + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1.safetensors", "c2.safetensors"]  # no temp files left


def test_online_session_matches_offline_compression():
    llm, emb = _models(torch.float32)
    torch.manual_seed(4)
    stream = torch.randint(0, 256, (100,))
    s = CompressionSession(llm, emb, k=4, chunk_len=8, window=24)
    for piece in stream.split([5, 11, 3, 20, 1, 30, 30]):
        s.append(piece)
        assert len(s) <= 24
    # condensed chunks are the stream's own chunks; raw is what follows them
    cond = s.condensed
    assert cond % 8 == 0 and torch.equal(s.raw[0], stream[cond:])
    ref = downscale(encode_chunks(emb, stream[None, :cond], 8), 4, [8] * (cond // 8))[:, s.dropped :]
    assert torch.allclose(s.comp, ref, atol=1e-6, rtol=0)
    assert s.logits().shape == (1, len(s), CFG.vocab_size)
    with pytest.raises(ValueError, match="window=9"):
        CompressionSession(llm, emb, k=4, chunk_len=8, window=9)


def test_config_errors_name_the_setting():
    for kw, match in ((dict(ks=[2, 0]), "compression.ks"), (dict(train_chunks=1), "compression.train_chunks"),
                      (dict(k=-2), "compression.k="), (dict(raw_len=5000), "compression.raw_len"),
                      (dict(baselines=["x"]), "compression.baselines")):
        with pytest.raises(ValueError, match=match):
            CompressionConfig(**kw).validate()
    llm, _ = _models()
    with pytest.raises(ValueError, match=r"compression.embedder_layers=4 must be in \[1, 3\]"):
        ExtensibleEmbedder(llm, 4)


@pytest.mark.timeout(180)
def test_train_and_eval_jobs(tmp_path):
    from ringrt.data.config import DataConfig
    from ringrt.jobs.config import EvalConfig, EvalJobConfig, TrainConfig, TrainJobConfig
    from ringrt.jobs.eval import run_eval
    from ringrt.jobs.train import run_train
    from ringrt.model.hf import load_pretrained, save_pretrained

    torch.manual_seed(0)
    save_pretrained(Llama(CFG), tmp_path / "llm", extra={"train_len": 64})
    before = {k: v.clone() for k, v in load_pretrained(tmp_path / "llm").state_dict().items()}
    comp = CompressionConfig(enabled=True, chunk_len=16, train_chunks=3, ks=[2, 4], embedder_layers=2)
    data = DataConfig(seq_len=64, batch_size=2)
    train = TrainConfig(steps=2, warmup_steps=1, log_every=1, out_dir=str(tmp_path / "et"), progress=False)
    with pytest.raises(ValueError, match="train.init_from"):
        run_train(TrainJobConfig(data=data, train=train, compression=comp))
    train.init_from = str(tmp_path / "llm")
    out = run_train(TrainJobConfig(data=data, train=train, compression=comp))
    assert out["step"] == 2 and all(l == l for l in out["losses"])
    emb, meta = load_embedder(out["embedder_dir"], load_pretrained(tmp_path / "llm"))
    assert meta["chunk_len"] == 16 and meta["ks"] == [2, 4] and emb.n_layers == 2
    after = load_pretrained(tmp_path / "llm").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the LLM on disk is untouched
    ev = dataclasses.replace(comp, doc_len=160, embedder=out["embedder_dir"])
    res = run_eval(EvalJobConfig(data=data, eval=EvalConfig(checkpoint=str(tmp_path / "llm"), tokens=320,
                                                            out_dir=str(tmp_path / "ev")), compression=ev), print_fn=lambda s: None)
    assert set(res["perplexity"]) == {"none", "truncate", "lambda", "k=2", "k=4"} and res["window"] == 64
    assert all(1 < v < 1000 for v in res["perplexity"].values())
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["perplexity"] == res["perplexity"]
    assert res["auto_k"] == 4  # 144 context tokens: k=2 -> 72 + 15 > 64; k=4 -> 36 + 15 <= 64
