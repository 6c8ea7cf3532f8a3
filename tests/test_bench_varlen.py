"""``ringrt bench varlen`` at a tiny size, and the document kernel's score counter it reads.

The counter: one spawn of W = 2 runs a causal packed forward per algorithm; the score entries kept,
summed over ranks, are B H sum_i P_i (P_i + 1) / 2 (P_i = L_i padded to a multiple of 2W). The
bench: its JSON has every field, the three variants agree, and the counted work and bytes are the
formulas' (bytes scale with the rows processed, padding included); the times are not checked.
"""

from __future__ import annotations

import json

import pytest
import torch

from ringrt.bench.varlen import VARIANTS, expected, padded_len
from tests.distributed import run

LENGTHS = [5, 12, 0, 1, 9]  # not multiples of 2W = 4, an empty document, a 1-token one
B, H, KVH, D = 2, 4, 2, 8
ALGS = ("tokenring", "ring", "allgather", "ulysses", "hybrid")


def _counted(rank, world, lengths):
    import ringrt
    from ringrt.ops.document_kernel import reset_scores, scores_counted

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    s = sum(lengths)
    q, k, v = (torch.randn(B, s, h, D, generator=g) for h in (H, KVH, KVH))
    ql, kl, vl = (ringrt.shard(x, layout="zigzag", cu_seqlens=cu) for x in (q, k, v))
    counts = {}
    for alg in ALGS:
        reset_scores()
        with torch.no_grad():
            ringrt.attention(ql, kl, vl, causal=True, cu_seqlens=cu, algorithm=alg)
        counts[alg] = scores_counted()
    return counts


@pytest.mark.timeout(120)
def test_counted_scores_are_the_causal_formula():
    world = 2
    per_rank = run(_counted, world, LENGTHS)
    p = [padded_len(x, world) for x in LENGTHS]
    want = B * H * sum(x * (x + 1) // 2 for x in p)
    for alg in ALGS:
        assert sum(r[alg] for r in per_rank) == want, alg
    assert expected(LENGTHS, world, H)["packed"]["scores"] * B == want


@pytest.mark.timeout(120)
def test_bench_varlen_tiny(tmp_path, capsys):
    from ringrt.cli import main

    out = tmp_path / "varlen.json"
    cases = [[12, 40, 7], [30, 5, 3, 9, 1]]
    algs = ["tokenring", "allgather"]
    assert main(["bench", "varlen", "--docs", *(",".join(map(str, c)) for c in cases), "--reps", "1",
                 "--heads", "2", "--kv-heads", "1", "--head-dim", "8", "--algorithms", *algs, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per_doc" in text and f"wrote {out}" in text
    data = json.loads(out.read_text())
    assert data["benchmark"] == "varlen" and data["config"]["world"] == 2
    rows = data["rows"]
    assert [(r["algorithm"], r["case"], r["variant"]) for r in rows] == [(a, c, v) for a in algs for c in range(2) for v in VARIANTS]
    for r in rows:
        lengths = cases[r["case"]]
        exp = expected(lengths, 2, 2)
        assert r["lengths"] == lengths and r["n_docs"] == len(lengths) and r["tokens"] == sum(lengths)
        assert r["calls"] == (len(lengths) if r["variant"] == "per_doc" else 1)
        assert r["t_s"] > 0 and r["t_ratio"] > 0 and len(r["t_all_s"]) == 1
        # counted work and bytes: their formulas, exactly
        assert r["scores"] == r["scores_formula"] == exp[r["variant"]]["scores"]
        assert r["scores_ratio"] == pytest.approx(exp[r["variant"]]["scores"] / exp["packed"]["scores"], rel=1e-12)
        assert r["rows"] == exp[r["variant"]]["rows"]
        assert r["bytes_ratio"] == pytest.approx(r["rows_ratio"], rel=1e-12)
        assert r["bytes_sent_per_rank"] > 0 and r["sends_per_rank"] > 0 and r["bytes_by_channel"]
        assert set(r["max_abs_diff_vs_packed"]) == {"out", "dq", "dk", "dv"}
        assert max(r["max_abs_diff_vs_packed"].values()) < 1e-4
    pad = next(r for r in rows if r["variant"] == "padded" and r["case"] == 1)
    pmax = padded_len(30, 2)
    assert pad["rows_ratio"] == pytest.approx(5 * pmax / sum(padded_len(x, 2) for x in cases[1]))
