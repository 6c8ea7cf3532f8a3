"""The jobs end to end on 2 gloo ranks (one spawn): train (loss falls, checkpoints, exact resume,
data x sequence mesh, bf16), eval (sharded perplexity = one-process perplexity, passkey, table,
PNG), generate (sharded prefill + sharded KV cache = one-process greedy decoding), bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil

import pytest
import torch

from ringrt.data.config import DataConfig
from ringrt.jobs.config import EvalConfig, EvalJobConfig, GenerateConfig, TrainConfig, TrainJobConfig
from ringrt.jobs.passkey import QUESTION, passkey_example
from ringrt.model.config import AttentionConfig, ModelConfig
from ringrt.run.lr_schedule import lr_at
from tests.distributed import run

LAMBDA = AttentionConfig(lambda_mask=True, n_global=4, n_local=16)
MODEL = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
DATA = DataConfig(seq_len=32, batch_size=4)


def _train_cfg(out_dir, steps, **kw) -> TrainJobConfig:
    t = TrainConfig(steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=2, ckpt_every=6, log_every=6, out_dir=str(out_dir),
                    progress=False, **kw)
    return TrainJobConfig(model=dataclasses.replace(MODEL), data=dataclasses.replace(DATA), train=t)


def _worker(rank, world, root):
    from ringrt.jobs.eval import run_eval
    from ringrt.jobs.generate import generate_ids
    from ringrt.jobs.train import run_train
    from ringrt.model.hf import load_pretrained

    out = {}
    a = run_train(_train_cfg(f"{root}/a", 12))
    if rank == 0:  # a run killed after its step-6 checkpoint: only that checkpoint is left
        shutil.copytree(f"{root}/a/checkpoints/step_00000006", f"{root}/b/checkpoints/step_00000006")
        os.makedirs(f"{root}/b/checkpoints/.step_00000009.tmp")  # and a save it did not finish
    torch.distributed.barrier()
    b = run_train(_train_cfg(f"{root}/b", 12))
    out["losses_a"], out["losses_b"] = a["losses"], b["losses"]
    out["ckpts_a"] = sorted(os.listdir(f"{root}/a/checkpoints"))
    out["dp2"] = run_train(_train_cfg(f"{root}/dp", 3, data_parallel=2))["losses"]
    out["bf16"] = run_train(_train_cfg(f"{root}/bf", 3, precision="bf16"))["losses"]

    ev = EvalConfig(checkpoint=f"{root}/a", multiples=[1, 4], tokens=256, passkey_multiples=[4], passkey_trials=2,
                    out_dir=f"{root}/eval")
    out["eval"] = run_eval(EvalJobConfig(data=dataclasses.replace(DATA), eval=ev))

    model = load_pretrained(f"{root}/a/hf")
    torch.manual_seed(5)
    prompt = torch.randint(0, 256, (2, 37))  # 37: padded to 40 for zigzag over 2 ranks
    out["greedy"] = generate_ids(model, prompt, GenerateConfig(max_new_tokens=10)).tolist()
    out["greedy_lambda"] = generate_ids(model, prompt, GenerateConfig(max_new_tokens=10), attention=LAMBDA, train_len=16).tolist()
    out["sampled"] = generate_ids(model, prompt, GenerateConfig(max_new_tokens=10, temperature=1.0, top_k=20, seed=3)).tolist()

    errors = []
    for bad in (lambda: run_train(_train_cfg(f"{root}/x", 2, data_parallel=3)),
                lambda: run_train(dataclasses.replace(_train_cfg(f"{root}/x", 2), data=DataConfig(seq_len=30))),
                lambda: generate_ids(model, prompt, GenerateConfig(max_prompt_tokens=20))):
        try:
            bad()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    return out


@pytest.mark.timeout(240)
def test_jobs_on_two_ranks(tmp_path):
    res = run(_worker, 2, str(tmp_path))
    r = res[0]
    # train: the loss falls from ln(259) ~ 5.56; checkpoints at 6 and 12; resume continues exactly
    assert r["losses_a"][0] > 5.0 and r["losses_a"][-1] < r["losses_a"][0] - 0.5, r["losses_a"]
    assert r["ckpts_a"] == ["step_00000006", "step_00000012"]
    assert r["losses_b"] == r["losses_a"][6:], (r["losses_b"], r["losses_a"])  # bit-identical continuation
    assert all(math.isfinite(x) for x in r["dp2"] + r["bf16"])
    assert res[1]["losses_a"] == r["losses_a"]  # both ranks report the same global loss
    # eval: sharded perplexity equals the one-process computation (fp32; sums in another order)
    from ringrt.data.batching import eval_sequences
    from ringrt.data.tokenizer import ByteTokenizer
    from ringrt.model.hf import load_pretrained

    model = load_pretrained(tmp_path / "a" / "hf")
    for L in (32, 128):
        seqs = eval_sequences(DATA, ByteTokenizer(), L, 256 // L)
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(model(seqs[:, :-1]).flatten(0, 1), seqs[:, 1:].flatten())
        for mode in ("vanilla", "lambda"):
            got = r["eval"]["perplexity"][mode][str(L)]
            if mode == "vanilla" or L == 32:  # within the window the Λ-mask is plain causal attention
                assert abs(got / math.exp(nll.item()) - 1) < 1e-5, (mode, L, got, math.exp(nll.item()))
    assert set(r["eval"]["passkey"]["vanilla"]["128"]) == {"0.0", "0.5", "1.0"}
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["perplexity"] == r["eval"]["perplexity"]
    assert (tmp_path / "eval" / "perplexity.png").stat().st_size > 1000
    assert "vanilla" in r["eval"]["table"] and "lambda" in r["eval"]["table"]
    # generate: equals one-process greedy decoding without any cache
    torch.manual_seed(5)
    x = torch.randint(0, 256, (2, 37))
    with torch.no_grad():
        for _ in range(10):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert r["greedy"] == res[1]["greedy"] == x[:, 37:].tolist()
    assert r["sampled"] == res[1]["sampled"]
    from ringrt.model.parallel import make_attend

    lam = make_attend(LAMBDA, model.config, train_len=16)  # one process, Λ-mask over the whole sequence
    x = x[:, :37]
    with torch.no_grad():
        for _ in range(10):
            x = torch.cat([x, model(x, attend=lam)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert r["greedy_lambda"] == res[1]["greedy_lambda"] == x[:, 37:].tolist()
    # bad input: the same ValueError on every rank, naming the setting
    for rr in res:
        assert "train.data_parallel=3 must divide the world size 2" in rr["errors"][0]
        assert "data.seq_len=30" in rr["errors"][1] and "multiple of 4" in rr["errors"][1]
        assert "max_prompt_tokens=20" in rr["errors"][2]


def test_lr_schedule_warms_up_then_decays_to_min():
    t = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, t) == pytest.approx(1e-4) and lr_at(9, t) == pytest.approx(1e-3)
    assert lr_at(55, t) == pytest.approx(5.5e-4) and lr_at(100, t) == pytest.approx(1e-4)


def test_passkey_prompt_has_the_key_at_the_requested_depth():
    from ringrt.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    for depth in (0.0, 0.5, 1.0):
        ids, n = passkey_example(tok, 512, depth, random.Random(0))
        text = tok.decode(ids.tolist())
        key = text[-n:]
        assert ids.shape == (513,) and n == 5 and key.isdigit()
        assert text.endswith(QUESTION + key)
        where = text.index(f"The pass key is {key}.") / (len(text) - len(QUESTION) - n)
        assert abs(where - depth) < 0.15, (depth, where)
    with pytest.raises(ValueError, match="too short"):
        passkey_example(tok, 40, 0.5, random.Random(0))
