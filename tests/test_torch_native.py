"""ringrt next to PyTorch's own distributed pieces, on W = 2 gloo processes (one spawn, every sub-case):

* ``group=`` takes a 1-D ``DeviceMesh`` or a slice ``mesh["sp"]`` (its process group, the same object
  every call, so ringrt's per-group caches hit); a 2-D mesh or another type is a ``ValueError``;
* a ``DTensor`` q/k/v is refused with the same ``ValueError`` on every rank, after only the input
  agreement's two all_gathers (no DTensor operation communicates), and the group stays usable;
* FSDP2 (``fully_shard``) over the same two ranks that shard the sequence: two SGD steps of ringrt's
  Llama with TokenRing attention and the sequence loss, loss and gradients against the one-process
  fp64 run on the full sequence.

And one W = 4 spawn: a (dp=2, sp=2) mesh, HSDP (``fully_shard`` on the 2-D mesh) with the sequence
over ``mesh["sp"]``, a real two-rank subgroup, against the one-process mean over both batches.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ringrt
from tests.distributed import run
from tests.reference import reference_attention

# fp64 on both sides: the runs differ only in summation order (the ring's merge of shard
# partials, the loss summed per shard, FSDP's reduce-scatter of two terms), ~1e-16 relative per
# operation. Measured on this machine: attention 0 (the same group, the same computation) and
# ~1e-16; model loss 0 and gradients ~4e-17 absolute (largest gradient ~0.16). 1e-12 is far above
# that rounding and far below any real mistake: FSDP's default divide factor halves every
# gradient, a lost shard drops a whole term.
TOL = 1e-12

B, S, H, KVH, D = 1, 8, 4, 2, 8  # attention sub-cases: full sequence S, W = 2
STEPS, SEQ, LR = 2, 16, 0.5  # FSDP2 sub-case: SGD steps, tokens per sequence (a multiple of 2W), learning rate


def _qkv(seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, S, h, D, generator=g, dtype=torch.float64) for h in (H, KVH, KVH))


def _error(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _meshes(rank, world):
    """group= as a DeviceMesh: outputs against group=None, cache identity, the refused kinds."""
    from torch.distributed.device_mesh import init_device_mesh

    from ringrt.distributed import groups
    from ringrt.lm_infinite import LambdaMask, lambda_attention
    from ringrt.model.parallel import sequence_loss, sum_gradients

    flat = init_device_mesh("cpu", (world,))
    dp_sp = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "sp"))
    sp_only = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "sp"))  # "sp": a one-rank subgroup per rank
    q, k, v = (ringrt.shard(t, layout="zigzag", group=dp_sp["sp"]) for t in _qkv(0))
    out = {}
    ref = ringrt.attention(q, k, v, group=None)
    cached = len(groups._CACHE)
    out["mesh_equal"] = [torch.equal(ringrt.attention(q, k, v, group=m), ref) for m in (flat, dp_sp["sp"], dp_sp["sp"])]
    out["cache_grew"] = len(groups._CACHE) - cached
    out["same_pg"] = groups.base_group(dp_sp["sp"])[0] is groups.base_group(dp_sp["sp"])[0]
    out["same_ring_groups"] = groups.ring_groups(dp_sp["sp"]) is groups.ring_groups(dp_sp["sp"])
    out["unshard_equal"] = torch.equal(ringrt.unshard(ref, layout="zigzag", group=flat),
                                       ringrt.unshard(ref, layout="zigzag", group=None))
    # a one-rank slice: plain attention on this rank's tensors
    alone = ringrt.attention(q, k, v, layout="contiguous", group=sp_only["sp"])
    out["one_rank_slice"] = (groups.base_group(sp_only["sp"])[2], (alone - reference_attention(q, k, v, causal=True)).abs().max().item())
    lq, lk, lv = (ringrt.shard(t, layout="contiguous", group=flat) for t in _qkv(1))
    mask = LambdaMask(n_global=1, n_local=3)
    out["lambda_equal"] = torch.equal(lambda_attention(lq, lk, lv, mask=mask, group=flat), lambda_attention(lq, lk, lv, mask=mask))
    # the model helpers: the loss and the gradient sum through a mesh slice
    logits = torch.randn(B, S // world, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2 + rank))
    labels = torch.arange(S // world).remainder(5).unsqueeze(0)
    out["loss_equal"] = torch.equal(sequence_loss(logits, labels, group=dp_sp["sp"]), sequence_loss(logits, labels))
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank + 1))
    sum_gradients([p], group=flat)
    out["grad_sum"] = p.grad.tolist()
    out["errors"] = {
        "attention_2d": _error(lambda: ringrt.attention(q, k, v, group=dp_sp)),
        "shard_2d": _error(lambda: ringrt.shard(q, layout="zigzag", group=dp_sp)),
        "loss_2d": _error(lambda: sequence_loss(logits, labels, group=dp_sp)),
        "attention_list": _error(lambda: ringrt.attention(q, k, v, group=[0, 1])),
        "lambda_str": _error(lambda: lambda_attention(lq, lk, lv, mask=mask, group="sp")),
    }
    return out


def _dtensors(rank, world):
    """DTensor inputs: the same error on every rank, only the agreement's gathers, then a valid call."""
    from ringrt.distributed.agree import clear_cache

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from ringrt.lm_infinite import LambdaMask, lambda_attention

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("sp",))
    full = _qkv(3)
    dq, dk, dv = (distribute_tensor(t, mesh, [Shard(1)]) for t in full)
    out = {}
    counter = CommDebugMode()
    with counter:
        out["all_dtensor"] = _error(lambda: ringrt.attention(dq, dk, dv, group=mesh))
    out["comm_counts"] = {str(op): n for op, n in counter.get_comm_counts().items()}
    local = [t.to_local() for t in (dq, dk, dv)]
    # only rank 1 hands over a DTensor k: every rank still raises, naming rank 1. Rank 0's plain
    # inputs may have a signature agreed on earlier in this process, and then it would skip the
    # agreement (Note [agreement cache]: both ranks would time out instead); every rank forgets them first.
    clear_cache()
    k1 = DTensor.from_local(local[1], mesh, [Shard(1)], run_check=False) if rank == 1 else local[1]
    out["rank1_k"] = _error(lambda: ringrt.attention(local[0], k1, local[2]))
    out["lambda"] = _error(lambda: lambda_attention(dq, dk, dv, mask=LambdaMask(n_global=1, n_local=3)))
    out["shard"] = _error(lambda: ringrt.shard(dq, layout="contiguous", group=mesh))
    out["unshard"] = _error(lambda: ringrt.unshard(dq, layout="contiguous", group=mesh))
    # what the message says to do: to_local() of Shard(1) is the contiguous layout
    got = ringrt.attention(*local, layout="contiguous", group=mesh)
    want = ringrt.shard(reference_attention(*full, causal=True), layout="contiguous", group=mesh)
    out["after"] = (got - want).abs().max().item()
    return out


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _model_and_reference(cfg):
    from ringrt.model.llama import Llama

    torch.manual_seed(0)  # the same initial weights on every rank: fully_shard keeps each rank's slice of them
    model = Llama(cfg).double()
    return model, copy.deepcopy(model)  # the one-process run, on every rank


def _reference_loss(ref, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of tokens (B, SEQ + 1) on one process, the full sequence."""
    logits = ref(tokens[:, :-1])  # (B, SEQ, vocab)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _fsdp(rank, world):
    """FSDP2 over the sequence ranks against one process on the full sequence, both fp64."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from ringrt.model.config import AttentionConfig, ModelConfig
    from ringrt.model.parallel import make_attend, sequence_loss, shard_batch

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model, ref = _model_and_reference(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(4))

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("sp",))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # Every rank's sequence_loss is the loss of the whole sequence, and its backward leaves on each rank
    # the gradient of that rank's tokens only: the full gradient is the SUM over ranks. FSDP2's
    # reduce-scatter divides by the number of ranks it reduces over by default (the mean over data-parallel
    # replicas); there is one replica here, so the factor is 1. It is set per fully_shard'ed module: the
    # root's setting does not reach the blocks, whose gradients would come out halved.
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
    attend = make_attend(AttentionConfig(algorithm="tokenring"), cfg, train_len=SEQ, group=mesh)
    shard = shard_batch(tokens, layout=attend.layout, group=mesh)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=LR), torch.optim.SGD(ref.parameters(), lr=LR)

    losses, grad_errs, grad_scale = [], [], 0.0
    for _ in range(STEPS):
        loss = sequence_loss(model(shard.input_ids, positions=shard.positions, attend=attend), shard.labels, group=mesh)
        loss.backward()
        ref_loss = _reference_loss(ref, tokens)
        ref_loss.backward()
        losses.append((loss.item(), ref_loss.item()))
        ref_grads = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor()  # after FSDP's reduce-scatter: this rank holds a slice
            grad_errs.append((name, _max_abs(grad, ref_grads[name].grad)))
            grad_scale = max(grad_scale, ref_grads[name].grad.abs().max().item())
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    return {"losses": losses, "grad_errs": grad_errs, "grad_scale": grad_scale,
            "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters())}


def _hsdp(rank, world):
    """(dp=2, sp=2): HSDP over the mesh, ringrt over mesh["sp"], against one process on both batches."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from ringrt.distributed import groups
    from ringrt.model.config import AttentionConfig, ModelConfig
    from ringrt.model.parallel import make_attend, sequence_loss, shard_batch

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model, ref = _model_and_reference(cfg)
    batches = torch.randint(0, cfg.vocab_size, (2, 2, SEQ + 1), generator=torch.Generator().manual_seed(5))  # (dp, B, SEQ + 1)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "sp"))
    dp = mesh["dp"].get_local_rank()
    for block in model.layers:
        fully_shard(block, mesh=mesh)  # 2-D mesh: replicated over "dp", sharded over "sp"
    fully_shard(model, mesh=mesh)
    # Sum over the sequence shards, mean over the two replicas' batches: divide by dp = 2
    # (FSDP's default divides by all 4 ranks, halving every gradient).
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(2.0)
    cached = len(groups._CACHE)
    attend = make_attend(AttentionConfig(algorithm="tokenring"), cfg, train_len=SEQ, group=mesh["sp"])
    shard = shard_batch(batches[dp], layout=attend.layout, group=mesh["sp"])
    loss = sequence_loss(model(shard.input_ids, positions=shard.positions, attend=attend), shard.labels, group=mesh["sp"])
    loss.backward()
    ref_losses = [_reference_loss(ref, b) for b in batches]
    (sum(ref_losses) / len(ref_losses)).backward()
    ref_grads = dict(ref.named_parameters())
    errs = [(name, _max_abs(p.grad.full_tensor(), ref_grads[name].grad)) for name, p in model.named_parameters()]
    return {"dp": dp, "loss": loss.item(), "ref_loss": ref_losses[dp].item(), "grad_errs": errs,
            "ring_groups_made": len(groups._CACHE) - cached,
            "slice_ranks": torch.distributed.get_process_group_ranks(groups.base_group(mesh["sp"])[0])}


def _worker(rank, world):
    return {"meshes": _meshes(rank, world), "dtensors": _dtensors(rank, world), "fsdp": _fsdp(rank, world)}


@pytest.fixture(scope="module")
def results():
    return run(_worker, 2, timeout=200)


def test_group_takes_none_a_process_group_or_a_1d_mesh_only():
    """Without torch.distributed: the type is named before anything else."""
    q = torch.randn(1, 4, 2, 4)
    with pytest.raises(ValueError, match=r"1-D DeviceMesh \(e\.g\. mesh\[\"sp\"\]\); got a value of type list"):
        ringrt.attention(q, q, q, group=[0, 1])
    with pytest.raises(ValueError, match=r"got a value of type object"):
        ringrt.shard(q, layout="zigzag", group=object())


@pytest.mark.timeout(260)
def test_device_mesh_group(results):
    for rank, res in enumerate(results):
        m = res["meshes"]
        assert m["mesh_equal"] == [True, True, True], rank
        assert m["cache_grew"] == 0 and m["same_pg"] and m["same_ring_groups"], rank
        assert m["unshard_equal"] and m["lambda_equal"] and m["loss_equal"], rank
        world_of_slice, err = m["one_rank_slice"]
        assert world_of_slice == 1 and err <= TOL, (rank, m["one_rank_slice"])
        assert m["grad_sum"] == [3.0, 3.0, 3.0], rank
        e = m["errors"]
        two_d = "group is a 2-D DeviceMesh (dims ('dp', 'sp'), shape (1, 2)); the sequence is sharded over one dimension"
        for name in ("attention_2d", "shard_2d", "loss_2d"):
            assert e[name] is not None and two_d in e[name] and 'pass group=mesh["<dim>"]' in e[name], (rank, name, e[name])
            assert "one of 'dp', 'sp'" in e[name], e[name]
        assert "got a value of type list" in e["attention_list"], e["attention_list"]
        assert "got a value of type str" in e["lambda_str"], e["lambda_str"]


@pytest.mark.timeout(260)
def test_dtensor_inputs_are_refused_on_every_rank(results):
    messages = set()
    for rank, res in enumerate(results):
        d = res["dtensors"]
        msg = d["all_dtensor"]
        assert msg is not None and msg.startswith("ringrt.attention: invalid input on ranks 0, 1: q is a DTensor "
                                                  "(placements (Shard(dim=1),) over a DeviceMesh with dims 'sp', shape (2,))"), msg
        assert "q.to_local()" in msg and "layout='contiguous'" in msg and "ringrt.shard(x, layout=" in msg, msg
        messages.add(msg)
        # the input summary and the problems' texts, nothing from DTensor
        assert sum(d["comm_counts"].values()) == 2 and all("allgather" in op for op in d["comm_counts"]), d["comm_counts"]
        assert d["rank1_k"] is not None and "invalid input on rank 1: k is a DTensor" in d["rank1_k"], d["rank1_k"]
        assert d["lambda"] is not None and d["lambda"].startswith("ringrt.lambda_attention: invalid input on ranks 0, 1: q is a DTensor"), d["lambda"]
        assert d["shard"].startswith("ringrt.shard: x is a DTensor (placements (Shard(dim=1),)); pass the full tensor"), d["shard"]
        assert d["unshard"].startswith("ringrt.unshard: x_local is a DTensor"), d["unshard"]
        assert d["after"] <= TOL, (rank, d["after"])
    assert len(messages) == 1


@pytest.mark.timeout(260)
def test_fsdp2_composes_with_sequence_parallel_attention(results):
    for rank, res in enumerate(results):
        f = res["fsdp"]
        assert f["sharded"], "fully_shard left plain parameters"
        assert len(f["losses"]) == STEPS
        for step, (loss, ref_loss) in enumerate(f["losses"]):
            assert abs(loss - ref_loss) <= TOL, (rank, step, loss, ref_loss)
        assert f["losses"][1][1] < f["losses"][0][1]  # the step changed the weights
        assert f["grad_scale"] > 1e-3
        bad = [(name, err) for name, err in f["grad_errs"] if err > TOL]
        assert not bad, (rank, bad)


@pytest.mark.timeout(260)
def test_hsdp_on_a_2d_mesh_with_the_sequence_over_its_sp_slice():
    results = run(_hsdp, 4, timeout=200)
    for rank, res in enumerate(results):
        assert res["dp"] == rank // 2 and res["slice_ranks"] == [rank - rank % 2, rank - rank % 2 + 1], res
        assert res["ring_groups_made"] == 1, res  # one entry for mesh["sp"], hit by every later call
        assert abs(res["loss"] - res["ref_loss"]) <= TOL, res
        bad = [(name, err) for name, err in res["grad_errs"] if err > TOL]
        assert not bad, (rank, bad)
