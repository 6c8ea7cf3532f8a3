"""Configs of the jobs (train, eval, generate, demo). Plain dataclasses, filled in by the CLI flags,
by Hydra (``launch/``) or by Python; each job is a function ``run_<job>(cfg) -> result``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..compression.config import CompressionConfig
from ..data.config import DataConfig
from ..model.config import AttentionConfig, ModelConfig

Precision = Literal["fp32", "bf16"]


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The optimizer, its schedule, checkpoints and logging of a training run."""

    steps: int = 200
    """Optimizer steps."""
    lr: float = 3e-3
    """Peak learning rate (after warm-up)."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Steps of linear warm-up from lr / warmup_steps to ``lr``."""
    weight_decay: float = 0.1
    """AdamW weight decay of the matrices (norms and other 1-d parameters get none)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's (beta1, beta2): decay of the gradient's running mean and of its square."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    data_parallel: int = 1
    """Replicas in the (data x sequence) mesh; the sequence-parallel size is world / data_parallel."""
    precision: Precision = "fp32"
    """``bf16``: bf16 autocast with fp32 weights and optimizer state."""
    out_dir: str = "outputs/train"
    """Checkpoints go to ``<out_dir>/checkpoints``, metrics to ``<out_dir>/metrics.jsonl``, the final
    model (Hugging Face format) to ``<out_dir>/hf``."""
    ckpt_every: int = 100
    """Save a checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    resume: bool = True
    """Continue from the latest checkpoint in ``out_dir`` when there is one."""
    init_from: str | None = None
    """Start from a Hugging Face Llama directory instead of random weights."""
    log_every: int = 10
    """Print a ``step N | loss ...`` line (and a metrics.jsonl row) every this many steps, and at the end."""
    progress: bool = True
    """Show a progress bar (rank 0, only on a terminal)."""
    seed: int = 0
    """Seeds the random initial weights (the data order has its own ``data.seed``)."""
    activation_checkpointing: Literal["none", "layers"] = "none"
    """``layers``: keep only each block's input for the backward and run the block again there (its
    MLP a slice of tokens at a time); the same loss and gradients for about one more forward of time.
    Bytes per token: Note [activation memory] in ``ringrt/model/memory.py``."""
    loss_chunk: int = 0
    """Tokens per chunk of the LM head + cross-entropy (the (S, vocab) logits never exist, forward
    or backward); 0 = the whole shard's logits at once."""


@dataclass(kw_only=True, slots=True)
class TrainJobConfig:
    """``ringrt train``: every section of a training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model trained from random weights (ignored with ``train.init_from``)."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """How attention runs over the sequence sharded across the ranks."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training text, its tokenizer and the sequence length."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimizer, its schedule, checkpoints and logging."""
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """With ``compression.enabled``: train the extensible embedder of the frozen ``train.init_from``."""


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """What ``ringrt eval`` measures, on which model, and where the results go."""

    checkpoint: str = "outputs/train/hf"
    """A Hugging Face Llama directory (config.json + safetensors) or a training ``out_dir``."""
    train_len: int | None = None
    """The length the model was trained at; None = read from the checkpoint (``ringrt.json``) or data.seq_len."""
    multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Perplexity is measured at these multiples of ``train_len``."""
    tokens: int = 16384
    """Validation tokens scored per length (whole sequences, at least one)."""
    modes: list[str] = field(default_factory=lambda: ["vanilla", "lambda"])
    """``vanilla`` (plain causal attention) and/or ``lambda`` (Λ-mask)."""
    passkey_multiples: list[int] = field(default_factory=list)
    """Passkey retrieval at these multiples of ``train_len``; empty = skip."""
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    """Where the key sits in the filler (0 = start, 1 = end)."""
    passkey_trials: int = 4
    """Passkey prompts (each with a new random key) per (length, depth)."""
    out_dir: str = "outputs/eval"
    """``results.json`` and ``perplexity.png`` (and ``passkey.png``) go here."""
    precision: Precision = "fp32"
    """``bf16``: run the model under bf16 autocast (scores are still summed in fp64)."""
    seed: int = 0
    """Seeds the passkeys and their filler text."""
    stream_multiples: list[int] = field(default_factory=list)
    """Λ-mask perplexity of one sequence of these multiples of ``train_len`` tokens, streamed window by
    window through constant-memory caches, one contiguous segment per rank (``ringrt/jobs/stream_eval.py``);
    e.g. ``[4096]`` = a million tokens for the demo model. Empty = skip."""
    stream_window: int = 256
    """Tokens per forward pass of the streaming evaluation (memory grows with it, not with the length)."""
    stream_baseline: bool = True
    """Also score the validation text in windows of ``train_len`` (the 1x reference the streamed
    perplexity is compared with)."""


@dataclass(kw_only=True, slots=True)
class EvalJobConfig:
    """``ringrt eval``: every section of an evaluation."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """How attention runs over the sequence sharded across the ranks (vanilla rows; the lambda rows add the Λ-mask)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The text scored: the validation documents of these files (``data.val_percent``)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """What is measured, on which model, and where the results go."""
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """With ``compression.enabled``: last-chunk perplexity, truncation / Λ-mask / Extensible Tokenization."""


@dataclass(kw_only=True, slots=True)
class GenerateConfig:
    """What ``ringrt generate`` reads, how it decodes, and how much."""

    checkpoint: str = "outputs/train/hf"
    """A Hugging Face Llama directory (config.json + safetensors) or a training ``out_dir``."""
    prompt: str = ""
    """The text to continue."""
    prompt_file: str | None = None
    """Read the prompt from this file (wins over ``prompt``)."""
    max_prompt_tokens: int = 1 << 20
    """Longer prompts are refused."""
    max_new_tokens: int = 64
    """Tokens generated after the prompt (fewer if the model emits <eos>)."""
    temperature: float = 0.0
    """0 = greedy; otherwise sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = all."""
    seed: int = 0
    """Seeds the sampling (unused when greedy)."""
    precision: Precision = "fp32"
    """``bf16``: run the model under bf16 autocast."""


@dataclass(kw_only=True, slots=True)
class GenerateJobConfig:
    """``ringrt generate``: every section of a generation."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """How attention runs over the prompt sharded across the ranks (and the Λ-mask cache with ``lambda_mask``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Only ``data.tokenizer`` is read (None = the checkpoint's, else the byte tokenizer)."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """What is read, how it is decoded, and how much."""


@dataclass(kw_only=True, slots=True)
class DemoConfig:
    """The embedded default job: train short, evaluate long, vanilla vs Λ-mask, on local CPU ranks."""

    world: int = 2
    """Local CPU ranks (gloo processes) started by the demo."""
    threads: int = 1
    """Intra-op threads per rank."""
    out_dir: str = "outputs/demo"
    """``results.json`` and ``perplexity.png`` go here, the training run (checkpoints, ``hf/``) to ``<out_dir>/train``."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2))
    """The demo's model: 4 layers, dim 128, 4 heads, 2 KV heads, byte-level."""
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=256, batch_size=8))
    """Training text (the Python standard library) cut into 256-token sequences."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, ckpt_every=0, log_every=25))
    """300 steps; one checkpoint, at the end (a re-run finds it and only evaluates)."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tokens=8192))
    """Perplexity at 1x..16x the training length, 8192 validation tokens per length."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention of training and of the vanilla rows (TokenRing, zigzag)."""
