"""Any Hugging Face decoder, sequence-parallel (``ringrt.hf``): parity with single-process transformers.

Reference: the same ``transformers`` model (random init, Llama, Qwen2 with q/k/v biases and
sliding-window layers, Mistral with a sliding window on every layer) run on one process over the
whole sequence with transformers' own ``sdpa`` attention (fp64 math on the CPU; its ``eager``
attention takes the softmax in fp32). The loss is cross-entropy in fp64 over the logits on both
sides (transformers' own loss upcasts to fp32 only). ringrt runs the model patched with
``ringrt.hf.patch`` on W = 2 and 4 gloo ranks, every schedule, each rank fed
``ringrt.hf.shard_inputs``; logits are gathered, gradients summed over the ranks.

Tolerances. fp64: logits, loss and gradients agree to a few 1e-16 relative (measured; summation
order only), asserted at 1e-10. fp32: flash-attention's rule, ringrt's error against the fp64
reference at most 2x transformers' own fp32 error (sdpa) plus one fp32 ulp of the magnitude.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run

transformers = pytest.importorskip("transformers")

B, S = 2, 24  # a multiple of 2W for W = 2, 4 (zigzag); shards of 6 tokens at W = 4
ALGS = ("tokenring", "ring", "allgather", "ulysses", "hybrid", "auto")
WINDOWS = {"qwen2": 5, "mistral": 9}  # 5 < shard, 9 > shard at W = 4: the halo comes from two ranks


def make_model(kind: str, dtype=torch.float64, *, sliding: bool = True, layers: int = 3):
    """A tiny random decoder: "llama", "qwen2" (its layers after the first slide unless ``sliding=False``) or "mistral"."""
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen2":  # biases on q/k/v; layers 1 and 2 slide, layer 0 is full attention
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, use_sliding_window=sliding, sliding_window=WINDOWS[kind],
                                                                       max_window_layers=1))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=WINDOWS[kind]))
    with torch.no_grad():  # non-trivial norm weights and biases, so a swapped one would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (B, S), generator=g)
    labels = ids.clone()
    labels[0, 3] = -100  # an unscored token
    return ids, labels


def _loss(logits, shift_labels):
    flat = shift_labels.flatten()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), flat, ignore_index=-100, reduction="sum")


def _reference(kind: str, dtype):
    ids, labels = _batch()
    model = make_model(kind, dtype)
    model.set_attn_implementation("sdpa")
    logits = model(input_ids=ids, use_cache=False).logits
    shift = torch.full_like(labels, -100)
    shift[:, :-1] = labels[:, 1:]
    loss = _loss(logits, shift) / (shift != -100).sum()
    loss.backward()
    return logits.detach().double(), loss.detach(), {n: p.grad.detach().double() for n, p in model.named_parameters()}


def _errors(got, ref):
    """max |Δ| / max |ref| of logits, loss, and the worst parameter gradient."""
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()  # noqa: E731
    logits, loss, grads = got
    r_logits, r_loss, r_grads = ref
    return rel(logits, r_logits), rel(loss, r_loss), max(rel(grads[n], r_grads[n]) for n in r_grads)


def _sp_step(kind, algorithm, dtype, checkpointing=False):
    import ringrt
    import ringrt.hf

    ids, labels = _batch()
    model = make_model(kind, dtype)
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
    sp = ringrt.hf.patch(model, algorithm=algorithm)
    inputs = ringrt.hf.shard_inputs({"input_ids": ids, "labels": labels}, layout=sp.layout)
    logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False).logits
    loss = ringrt.hf.sequence_loss(logits, inputs["shift_labels"])
    loss.backward()
    ringrt.hf.sum_gradients(model.parameters())
    full = ringrt.unshard(logits.detach().contiguous(), layout=sp.layout)
    return full.double(), loss.detach().double(), {n: p.grad.detach().double() for n, p in model.named_parameters()}


def _parity_worker(rank, world, cases):
    refs = {}
    out = {}
    for kind, algorithm, dtype in cases:
        for dt in {torch.float64, dtype}:
            if (kind, dt) not in refs:
                refs[kind, dt] = _reference(kind, dt)
        ours = _errors(_sp_step(kind, algorithm, dtype), refs[kind, torch.float64])
        theirs = _errors(refs[kind, dtype], refs[kind, torch.float64])
        out[kind, algorithm, str(dtype)] = (ours, theirs)
    return out


def _cases(world):
    cases = [(kind, alg, torch.float64) for kind in ("llama", "qwen2", "mistral") for alg in ALGS]
    cases += [(kind, "tokenring", torch.float32) for kind in ("llama", "qwen2", "mistral")]
    return cases


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_parity_with_transformers(world):
    results = run(_parity_worker, world, _cases(world), timeout=280)
    for key, (ours, theirs) in results[0].items():
        assert all(r[key] == results[0][key] for r in results), key  # every rank gathered the same logits and grads
        kind, algorithm, dtype = key
        for name, a, b in zip(("logits", "loss", "grads"), ours, theirs, strict=True):
            if dtype == "torch.float64":
                assert a <= 1e-10, (key, name, a)
            else:
                assert a <= 2 * b + torch.finfo(torch.float32).eps, (key, name, a, b)
    print({k: v[0] for k, v in results[0].items()})


def _caught(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _failure_worker(rank, world, tmp):
    import torch.distributed as dist

    import ringrt
    import ringrt.hf
    from ringrt.lm_infinite import LambdaMask

    ids, labels = _batch()
    res = {}
    model = make_model("llama")
    sp = ringrt.hf.patch(model)
    inputs = ringrt.hf.shard_inputs({"input_ids": ids, "labels": labels}, layout=sp.layout)
    local = inputs["input_ids"]
    res["no_position_ids"] = _caught(lambda: model(input_ids=local, use_cache=False))
    res["padding"] = _caught(lambda: model(input_ids=local, position_ids=inputs["position_ids"], use_cache=False,
                                           attention_mask=torch.ones_like(local).index_fill_(1, torch.tensor([0]), 0)))
    mask = torch.ones_like(local)
    if rank == 1:
        mask[1, -1] = 0  # one padded token on one rank only
    res["padding_one_rank"] = _caught(lambda: model(input_ids=local, position_ids=inputs["position_ids"], use_cache=False,
                                                    attention_mask=mask))
    shifted = inputs["position_ids"] + 1
    res["wrong_positions"] = _caught(lambda: model(input_ids=local, position_ids=shifted, use_cache=False))
    model.config.attention_dropout = 0.1
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.1
    res["dropout"] = _caught(lambda: model.train()(input_ids=local, position_ids=inputs["position_ids"], use_cache=False))
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.0
    res["zigzag_on_windows"] = _caught(lambda: ringrt.hf.patch(make_model("qwen2"), layout="zigzag"))
    # after the refusals, a valid step runs (no collective left half-done) and matches the reference
    logits = model(input_ids=local, position_ids=inputs["position_ids"], use_cache=False).logits
    ref = _reference("llama", torch.float64)
    res["after"] = ((ringrt.unshard(logits.detach().contiguous(), layout=sp.layout) - ref[0]).abs().max().item())
    # the model's own loss on shard_inputs is this rank's share; the shares add up to the full loss
    share = model(**inputs, use_cache=False).loss.detach().double()
    dist.all_reduce(share)
    res["loss_shares"] = abs(share.item() - ref[1].item())
    # attn_implementation="ringrt" on from_pretrained, never patched: default settings
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="ringrt", dtype=torch.float64)
    logits = loaded(input_ids=local, position_ids=inputs["position_ids"], use_cache=False).logits
    res["from_pretrained"] = (ringrt.unshard(logits.detach().contiguous(), layout="zigzag") - ref[0]).abs().max().item()
    # LM-Infinite's Λ-mask on a transformers model: the same logits on 2 ranks as on one
    lam = LambdaMask(n_global=2, n_local=5)
    model = make_model("llama")
    sp = ringrt.hf.patch(model, lambda_mask=lam)
    inputs = ringrt.hf.shard_inputs({"input_ids": ids}, layout=sp.layout)
    logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False).logits
    full = ringrt.unshard(logits.detach().contiguous(), layout=sp.layout)
    single = make_model("llama")
    ringrt.hf.patch(single, lambda_mask=lam, group=dist.new_group([rank]))  # one-rank groups: the whole sequence here
    res["lambda"] = (full - single(input_ids=ids, use_cache=False).logits.detach()).abs().max().item()
    res["lambda_vs_dense"] = (full - ref[0]).abs().max().item()  # the mask changes the result (it is applied)
    res["fsdp2"] = _fsdp2_qwen2(world)
    res["checkpointing"] = _checkpointed_qwen2()
    return res


def _fsdp2_qwen2(world):
    """Qwen2 under FSDP2 (fully_shard per decoder layer and the root, over a 1-D mesh that is also
    the sequence group): loss and full gradients against the one-process fp64 reference. FSDP's
    reduce-scatter would divide by the world size; the sequence shards' gradients must be summed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    import ringrt.hf

    mesh = init_device_mesh("cpu", (world,))
    ids, labels = _batch()
    model = make_model("qwen2")
    sp = ringrt.hf.patch(model, group=mesh)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
    inputs = ringrt.hf.shard_inputs({"input_ids": ids, "labels": labels}, layout=sp.layout, group=mesh)
    logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False).logits
    loss = ringrt.hf.sequence_loss(logits, inputs["shift_labels"], group=mesh)
    loss.backward()
    grads = {n: p.grad.full_tensor().double() for n, p in model.named_parameters()}
    full = ringrt.unshard(logits.detach().contiguous(), layout=sp.layout, group=mesh)
    return _errors((full.double(), loss.detach().double(), grads), _reference("qwen2", torch.float64))


def _checkpointed_qwen2():
    """The same step with activation checkpointing: each layer's attention runs again in the backward."""
    return _errors(_sp_step("qwen2", "tokenring", torch.float64, checkpointing=True), _reference("qwen2", torch.float64))


@pytest.mark.timeout(200)
def test_refusals_and_entry_points(tmp_path):
    make_model("llama").save_pretrained(tmp_path / "llama")
    results = run(_failure_worker, 2, str(tmp_path / "llama"), timeout=180)
    for key, want in [("no_position_ids", "are not rank"), ("padding", "attention_mask pads 2 token"),
                      ("padding_one_rank", "invalid input on rank 1"), ("wrong_positions", "are not rank"),
                      ("dropout", "dropout=0.1 is not supported"), ("zigzag_on_windows", "sliding-window layers")]:
        for r in results:
            assert want in r[key], (key, r[key])
    assert "position_ids" in results[1]["no_position_ids"] and "[6, 7, 8, ..., 16, 17]" in results[1]["no_position_ids"]
    for r in results:
        assert r["after"] <= 1e-12 and r["from_pretrained"] <= 1e-12, r
        assert r["loss_shares"] <= 1e-6, r  # transformers' own loss runs in fp32
        assert r["lambda"] <= 1e-12 and r["lambda_vs_dense"] > 1e-3, r
        assert max(r["fsdp2"]) <= 1e-10 and max(r["checkpointing"]) <= 1e-10, (r["fsdp2"], r["checkpointing"])


def test_shard_inputs_single_process():
    import ringrt.hf

    ids = torch.arange(10).reshape(2, 5) + 1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = ringrt.hf.shard_inputs({"input_ids": ids, "attention_mask": mask}, layout="zigzag")
    # one process, zigzag: 2 chunks, so 5 tokens are padded to 6; labels shifted before sharding
    assert got["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 0]]
    assert got["shift_labels"].tolist() == [[2, 3, 4, 5, -100, -100], [7, 8, -100, -100, -100, -100]]
    assert got["labels"] is got["shift_labels"] and int(got["num_items_in_batch"]) == 6
    assert got["position_ids"].tolist() == [list(range(6))] * 2
    with pytest.raises(ValueError, match=r"row 1 pads before or between real tokens"):
        ringrt.hf.shard_inputs({"input_ids": ids, "attention_mask": mask.flip(1)})
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] must be an integer tensor \(batch, seq\), got torch.float32"):
        ringrt.hf.shard_inputs({"input_ids": ids.float()})
    with pytest.raises(ValueError, match=r"batch\['labels'\] must be a tensor shaped like input_ids \(2, 5\)"):
        ringrt.hf.shard_inputs({"input_ids": ids, "labels": ids[:, :3]})
    with pytest.raises(ValueError, match="layout='zig' is not a known layout"):
        ringrt.hf.shard_inputs({"input_ids": ids}, layout="zig")


@pytest.mark.timeout(200)
def test_worked_example_finetunes_on_two_ranks(tmp_path):
    """launch/hf_finetune.py as the README runs it: the first step matches one process, the loss
    falls, the model is saved into a new directory, and an existing --out is refused."""
    import re
    import shutil

    from tests.launch_util import REPO, run as launch

    out = tmp_path / "finetuned"
    cmd = [shutil.which("torchrun"), "--standalone", "--nproc-per-node=2", str(REPO / "launch" / "hf_finetune.py"),
           "--steps", "8", "--seq-len", "256", "--check", "--out", str(out)]
    p = launch(cmd, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"sequence-parallel loss ([\d.]+); one-process loss ([\d.]+); worst relative gradient difference ([\d.e+-]+)", p.stdout)
    assert m, p.stdout
    assert abs(float(m[1]) - float(m[2])) <= 1e-5 and float(m[3]) <= 1e-4, m.group(0)  # fp32, measured ~2e-6
    losses = [float(x) for x in re.findall(r"step +\d+  loss ([\d.]+)", p.stdout)]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob("finetuned.tmp-*"))
    again = launch([*cmd[:3], str(REPO / "launch" / "hf_finetune.py"), "--out", str(out)], timeout=120)
    assert again.returncode != 0 and f"--out={out} exists" in again.stderr
