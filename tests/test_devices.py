"""The GPU path checked on a CPU box: which device and backend a launch picks, and that every job
keeps every tensor on its model's device.

* Launcher: ``torch.cuda`` and ``init_process_group`` are replaced by recorders; the backend string,
  the bound ``device_id`` and the current device are asserted (``local_rank % visible GPUs``).
* Jobs: the job device is ``meta`` (:mod:`tests.device_util`): a job that builds a batch, a label,
  a position, a loss total or a random generator on the CPU while its model sits elsewhere shows up
  as an op that mixes devices, which is the "Expected all tensors to be on the same device" of a GPU
  run. Host reads (``.item()``) are counted: one per optimizer step, not per micro-batch.
* ``validate.local_problem``: a CUDA tensor that is not on the current CUDA device is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from ringrt.data.config import DataConfig
from ringrt.jobs.config import EvalConfig, EvalJobConfig, GenerateConfig, GenerateJobConfig, TrainConfig, TrainJobConfig
from ringrt.model.config import AttentionConfig, ModelConfig
from ringrt.model.llama import Llama
from tests.device_util import META, DeviceRecorder

MODEL = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
DATA = DataConfig(seq_len=32, batch_size=2)
READ = "aten._local_scalar_dense.default"  # .item() / float() / bool() of a device tensor


@pytest.fixture
def no_process_group():
    """Every test here starts and ends without a default process group."""
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def on_meta(monkeypatch, no_process_group):
    """The job device is ``meta`` (the one device function every job asks)."""
    monkeypatch.setattr("ringrt.distributed.device.job_device", lambda: META)
    monkeypatch.delenv("RINGRT_DEVICE", raising=False)


def _fake_world(world: int, rank: int = 0) -> None:
    """A process group of ``world`` ranks that moves nothing (meta tensors welcome); this process is ``rank``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


# ---------------------------------------------------------------- launcher: backend and device ----

@pytest.fixture
def launch(monkeypatch, no_process_group):
    """A torchrun-like environment and recorders in place of CUDA and init_process_group."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "PMI", "SUBMITIT_", "TORCHELASTIC_")):
            monkeypatch.delenv(name)
    calls: dict = {"set_device": [], "init": []}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls["init"].append((a, kw)))

    def configure(*, local_rank: int, visible: int, world: int = 4):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        for k, v in (("RANK", local_rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", world),
                     ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", 29555)):
            monkeypatch.setenv(k, str(v))
        return calls

    return configure


@pytest.mark.parametrize("backend", ["auto", "nccl"])
@pytest.mark.parametrize("local_rank,visible,index", [(3, 1, 0), (3, 4, 3), (5, 4, 1)])
def test_launcher_binds_nccl_to_local_rank_modulo_visible_gpus(launch, backend, local_rank, visible, index):
    """LOCAL_RANK=3 on a task that sees one GPU (Slurm --gpus-per-task=1) uses cuda:0, not cuda:3;
    CPU tensors keep a gloo path (cpu:gloo,cuda:nccl), also for an explicit backend=nccl."""
    from ringrt.distributed.launcher import init_distributed

    calls = launch(local_rank=local_rank, visible=visible)
    init_distributed(backend, timeout_s=60)
    [(args, kw)] = calls["init"]
    assert args[0] == "cpu:gloo,cuda:nccl"
    assert kw["device_id"] == torch.device("cuda", index)
    assert kw["init_method"] == "tcp://127.0.0.1:29555" and kw["rank"] == local_rank and kw["world_size"] == 4
    assert kw["timeout"] == datetime.timedelta(seconds=60)
    assert [torch.device(d) for d in calls["set_device"]] == [torch.device("cuda", index)]


def test_launcher_uses_gloo_without_cuda(launch):
    from ringrt.distributed.launcher import init_distributed

    calls = launch(local_rank=1, visible=0, world=2)
    init_distributed("auto")
    [(args, kw)] = calls["init"]
    assert args[0] == "gloo" and kw.get("device_id") is None and calls["set_device"] == []
    init_distributed("gloo")
    assert calls["init"][1][0][0] == "gloo"


def test_launcher_nccl_without_cuda_is_a_clear_error(launch):
    from ringrt.distributed.launcher import init_distributed

    calls = launch(local_rank=0, visible=0, world=2)
    with pytest.raises(ValueError, match=r"launcher.backend='nccl' needs CUDA, but torch.cuda.is_available\(\) is False"):
        init_distributed("nccl")
    assert calls["init"] == [] and calls["set_device"] == []


def test_launcher_restart_store_path_binds_device(launch, monkeypatch):
    """torchrun --max-restarts: the per-attempt PrefixStore path binds the device too."""
    from ringrt.distributed.launcher import init_distributed

    calls = launch(local_rank=2, visible=2)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setattr(dist, "TCPStore", lambda *a, **kw: ("agent-store", a))
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: (prefix, store))
    init_distributed("auto")
    [(args, kw)] = calls["init"]
    assert args[0] == "cpu:gloo,cuda:nccl" and kw["device_id"] == torch.device("cuda", 0)
    assert kw["store"][0] == "ringrt/attempt_1" and kw["rank"] == 2


# ---------------------------------------------------------------------- the job's device rule ----

def test_job_device_rule(monkeypatch, no_process_group, tmp_path):
    from ringrt.distributed.device import job_device

    monkeypatch.delenv("RINGRT_DEVICE", raising=False)
    assert job_device() == torch.device("cpu")  # this box: no CUDA
    monkeypatch.setenv("RINGRT_DEVICE", "cuda")
    with pytest.raises(ValueError, match=r"RINGRT_DEVICE=cuda but torch.cuda.is_available\(\) is False"):
        job_device()
    monkeypatch.setenv("RINGRT_DEVICE", "gpu")
    with pytest.raises(ValueError, match=r"RINGRT_DEVICE='gpu' is not valid; valid: auto, cpu, cuda"):
        job_device()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setenv("RINGRT_DEVICE", "auto")
    assert job_device() == torch.device("cuda", 2)  # one process: the current CUDA device
    monkeypatch.setenv("RINGRT_DEVICE", "cpu")
    assert job_device() == torch.device("cpu")  # forced, even with CUDA
    monkeypatch.setenv("RINGRT_DEVICE", "auto")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:  # a group that would carry CUDA tensors over gloo: the job stays on the CPU
        assert job_device() == torch.device("cpu")
        monkeypatch.setenv("RINGRT_DEVICE", "cuda")
        with pytest.raises(ValueError, match=r"carries CUDA tensors over 'gloo'; valid: launcher.backend=auto or nccl"):
            job_device()
        monkeypatch.setenv("RINGRT_DEVICE", "auto")
        # what init_distributed builds on a GPU node: CUDA tensors over NCCL, the bound device wins
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
        assert job_device() == torch.device("cuda", 2)
        monkeypatch.setattr(dist.group.WORLD, "bound_device_id", torch.device("cuda", 1), raising=False)
        assert job_device() == torch.device("cuda", 1)
    finally:
        dist.destroy_process_group()


def test_cuda_index_is_local_rank_modulo_visible(monkeypatch):
    from ringrt.distributed.device import cuda_index

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [cuda_index(r) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"no CUDA device is visible to local rank 3"):
        cuda_index(3)


# ------------------------------------------------- validate.local_problem: the current device ----

class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports cuda:1 (what local_problem looks at), to check the rule without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_local_problem_refuses_a_tensor_off_the_current_cuda_device(monkeypatch):
    from ringrt.distributed.device import wrong_cuda_device
    from ringrt.distributed.agree import local_problem

    assert wrong_cuda_device(torch.device("cuda", 1), 1) is None
    assert wrong_cuda_device(torch.device("cpu"), 0) is None and wrong_cuda_device(META, 0) is None
    q = torch.zeros(1, 4, 2, 8).as_subclass(_OnCuda1)
    args = dict(causal=True, algorithm="tokenring", algorithms=("tokenring",), layout="zigzag", topology="full",
                topologies=("full",), softmax_scale=None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    msg = local_problem(q, q, q, **args, world=2)
    assert msg is not None and "q is on cuda:1 but the current CUDA device is cuda:0" in msg
    assert "torch.cuda.set_device(1)" in msg and "ringrt.distributed.launcher.init_distributed" in msg
    assert local_problem(q, q, q, **args, world=1) is None  # one process: no communicator to confuse
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert local_problem(q, q, q, **args, world=2) is None


# --------------------------------------------------------------- jobs on the model's device ----

def _batches(n: int, batch: int = 2, seq: int = 32):
    g = torch.Generator().manual_seed(0)
    return iter([torch.randint(0, 256, (batch, seq + 1), generator=g) for _ in range(n)])  # CPU, as the data pipeline gives them


@pytest.mark.parametrize("world", [1, 2])
def test_train_step_keeps_batches_and_totals_on_the_model_device(on_meta, world):
    """Micro-batches, labels, positions, the loss total, its data-parallel all_reduce and the grad norm
    all on the model's device; nothing read back to the host inside the step."""
    from ringrt.jobs.train import _optimizer, train_step
    from ringrt.model.parallel import mesh

    if world > 1:
        _fake_world(world)
    t = TrainConfig(grad_accum=2, data_parallel=world)
    seq_group, data_group, _, _ = mesh(t.data_parallel)
    model = Llama(MODEL).to(META)
    opt = _optimizer(model, t)
    with DeviceRecorder() as rec:
        total, gnorm = train_step(model, opt, _batches(2), t=t, lr=1e-3, layout="zigzag", attend=None,
                                  seq_group=seq_group, data_group=data_group)
    rec.check(min_ops=500)
    assert rec.reads == [] and total.device == META and gnorm.device == META


def test_run_train_whole_job_on_the_job_device(on_meta, tmp_path, monkeypatch):
    """The whole plain trainer on the job device: one host read per step (the loss) plus the grad
    norm at log steps; the final model is copied to the host once to be written."""
    from ringrt.jobs.train import run_train
    from ringrt.run.metrics import MetricsLogger

    monkeypatch.setattr("ringrt.run.checkpoint.save", lambda *a, **kw: None)  # DCP cannot write meta tensors
    logged = []
    cfg = TrainJobConfig(model=dataclasses.replace(MODEL), data=dataclasses.replace(DATA),
                         train=TrainConfig(steps=3, grad_accum=2, log_every=2, out_dir=str(tmp_path), progress=False))
    with DeviceRecorder() as rec:
        out = run_train(cfg, logger=MetricsLogger([lambda step, m: logged.append(m)]))
    rec.check(min_ops=1000)
    assert rec.reads.count(READ) == 3 + 2  # a loss per step, a grad norm at steps 2 and 3
    assert out["losses"] == [0.0, 0.0, 0.0] and all(isinstance(m["grad_norm"], float) for m in logged)


class _FakeEngine:
    """What ``deepspeed_step`` uses of a DeepSpeed engine, around a model on ``meta``."""

    def __init__(self, model, opt):
        self.module, self.optimizer, self.device = model, opt, META

    def __call__(self, *args, **kw):
        return self.module(*args, **kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def test_deepspeed_step_moves_batches_to_the_engine_device(on_meta):
    from ringrt.engines.deepspeed import deepspeed_step, engine_args
    from ringrt.jobs.train import _optimizer

    t = TrainConfig(grad_accum=2)
    model = Llama(MODEL).to(META)
    engine = _FakeEngine(model, _optimizer(model, t))
    with DeviceRecorder() as rec:
        total = deepspeed_step(engine, _batches(2), t=t, lr=1e-3, layout="zigzag", attend=None, seq_group=None, data_group=None)
    rec.check(min_ops=500)
    assert rec.reads == [] and total.device == META
    assert engine_args(torch.device("cuda", 0)).device_rank == 0 and engine_args(torch.device("cpu")) is None


def test_eval_scores_on_the_model_device(on_meta, tmp_path):
    from ringrt.jobs.eval import passkey_accuracy, perplexity, run_eval
    from ringrt.data.tokenizer import load_tokenizer

    model = Llama(MODEL).to(META).eval()
    ev = EvalConfig(checkpoint=str(tmp_path / "unused"), train_len=32, multiples=[1, 4], tokens=128, passkey_multiples=[4],
                    passkey_trials=2, out_dir=str(tmp_path / "eval"))
    with DeviceRecorder() as rec:
        res = run_eval(EvalJobConfig(data=dataclasses.replace(DATA), eval=ev), model=model, print_fn=lambda *a: None)
    rec.check(min_ops=1000)
    assert set(res["perplexity"]) == {"vanilla", "lambda"} and res["passkey"]
    with DeviceRecorder() as rec:  # one read per table cell, not one per sequence or trial
        perplexity(model, torch.randint(0, 256, (3, 33)), None, "zigzag")
        passkey_accuracy(model, load_tokenizer(None), 128, 0.5, 3, None, "zigzag", seed=0)
    rec.check()
    assert rec.reads == [READ, READ]


@pytest.mark.parametrize("attention", [AttentionConfig(), AttentionConfig(lambda_mask=True, n_global=2, n_local=8)],
                         ids=["ring", "lambda"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_generate_decodes_on_the_model_device(on_meta, tmp_path, attention, temperature, monkeypatch):
    """Prompt, cache, decoded tokens, their positions, the eos flags and the sampler's generator on
    the model's device: the job (which stops at the first read eos flag here) and four decode steps."""
    from ringrt.jobs.generate import generate_ids, run_generate
    from tests.device_util import MetaGenerator

    monkeypatch.setattr(torch, "Generator", MetaGenerator)
    model = Llama(MODEL).to(META).eval()
    g = GenerateConfig(checkpoint=str(tmp_path / "unused"), prompt="def f(x):\n", max_new_tokens=4, temperature=temperature,
                       top_k=5)
    with DeviceRecorder() as rec:
        out = run_generate(GenerateJobConfig(attention=attention, generate=g), model=model)
        new = generate_ids(model, torch.randint(0, 256, (2, 13)), g, attention=attention, eos_id=None)  # (2, 4)
    rec.check(min_ops=300)
    assert out["prompt_tokens"] == 10 and tuple(new.shape) == (2, 4) and new.device == META
    if not attention.lambda_mask:  # (the Λ cache checks each decode step's positions on the host)
        assert rec.reads.count(READ) == 1  # the job's eos flag (run_generate then copies the ids once)


def test_probe_runs_on_the_job_device(on_meta, monkeypatch):
    from ringrt.jobs.probe import ProbeConfig, run_probe

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    with DeviceRecorder() as rec:
        result = run_probe(ProbeConfig(seq_len=16))
    rec.check(min_ops=100)
    assert len(rec.reads) == 1  # errors and tolerances of out, dq, dk, dv: one read
    assert result["ranks"][0]["device"] == "meta" and result["ok"]


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # the embedder file into meta weights
def test_compression_jobs_on_the_job_device(on_meta, tmp_path):
    from ringrt.compression import CompressionSession, EmbeddingCache
    from ringrt.compression.config import CompressionConfig
    from ringrt.compression.embedder import ExtensibleEmbedder
    from ringrt.jobs.eval import run_eval
    from ringrt.jobs.train import run_train
    from ringrt.model.hf import save_pretrained

    torch.manual_seed(0)
    save_pretrained(Llama(MODEL), tmp_path / "llm", extra={"train_len": 32})  # a real (CPU) checkpoint to start from
    comp = CompressionConfig(enabled=True, chunk_len=8, ks=[2, 4], train_chunks=3, embedder_layers=1, doc_len=96,
                             embedder=str(tmp_path / "ct" / "embedder"), train_minutes=60.0)
    train = TrainConfig(steps=2, grad_accum=2, log_every=1, out_dir=str(tmp_path / "ct"), init_from=str(tmp_path / "llm"),
                        progress=False)
    with DeviceRecorder() as rec:
        out = run_train(TrainJobConfig(data=dataclasses.replace(DATA), train=train, compression=comp))
    rec.check(min_ops=1000)
    assert rec.reads.count(READ) == 2 * 3  # per step: the loss, the grad norm, the out-of-time flag
    assert out["step"] == 2
    ev = EvalConfig(checkpoint=str(tmp_path / "llm"), tokens=200, out_dir=str(tmp_path / "ce"))
    with DeviceRecorder() as rec:
        res = run_eval(EvalJobConfig(data=dataclasses.replace(DATA), eval=ev, compression=comp), print_fn=lambda *a: None)
    rec.check(min_ops=1000)
    assert set(res["perplexity"]) == {"none", "truncate", "lambda", "k=2", "k=4"}

    llm = Llama(MODEL).to(META).eval()
    emb = ExtensibleEmbedder(llm, 1)
    with DeviceRecorder() as rec:  # the online session and the offline cache follow the LLM's device too
        s = CompressionSession(llm, emb, k=2, chunk_len=8, window=16)
        s.append(torch.arange(20))
        s.logits()
        cache = EmbeddingCache.build(emb, torch.arange(40), chunk_len=8, base_k=2)
        cache.compressed(4)
    rec.check(min_ops=100)
    assert {p.device for p in emb.parameters()} == {META}


def test_metrics_read_device_values_only_where_printed():
    from ringrt.run.metrics import MetricsLogger

    got = []
    with DeviceRecorder() as rec:
        MetricsLogger([lambda step, m: got.append(m)], enabled=False).log(1, grad_norm=torch.zeros((), device=META))
        assert rec.reads == []  # ranks that print nothing never wait for the number
        MetricsLogger([lambda step, m: got.append(m)]).log(1, grad_norm=torch.zeros((), device=META), lr=0.1)
    assert rec.reads == [READ] and got == [{"grad_norm": 0.0, "lr": 0.1}] and isinstance(got[0]["grad_norm"], float)
