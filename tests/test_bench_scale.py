"""``ringrt bench scale`` end to end on a tiny grid: one point on two ranks (one spawn: a few seconds),
a dense point skipped by its cap, the JSON and PNG it writes."""

from __future__ import annotations

import argparse
import json

import pytest

from ringrt.bench import scale


@pytest.mark.timeout(120)
def test_bench_scale_writes_json(tmp_path, capsys):
    p = argparse.ArgumentParser()
    scale.add_arguments(p)
    out = tmp_path / "scale.json"
    args = p.parse_args(["--tokens", "2048", "--worlds", "2", "--attention", "lambda", "dense", "--dense-max", "1024",
                         "--n-local", "64", "--loss-chunk", "512", "--timeout", "90", "--out", str(out)])
    assert scale.main(args) == 0
    data = json.loads(out.read_text())
    rows = {(r["attention"], r["tokens"]): r for r in data["rows"]}
    assert set(rows) == {("lambda", 2048)}
    assert data["config"]["skipped"] == ["skip dense W=2 N=2048: N=2048 > --dense-max 1024"]
    for r in rows.values():
        assert r["world"] == 2 and len(r["ranks"]) == 2
        assert r["mb_moved_per_rank"] > 0 and r["peak_gib_per_rank"] > 0 and r["formula_gib_per_rank"] > 0
    assert 0.5 < rows["lambda", 2048]["act_over_formula"] < 3  # a loose sanity bound at this tiny size (test_memory checks 1.5x)
    assert out.with_suffix(".png").is_file()
    assert "time per token" in capsys.readouterr().out
