"""Fine-tune a Hugging Face model sequence-parallel with a plain torch loop: the worked example.

    torchrun --standalone --nproc-per-node=2 launch/hf_finetune.py                 # tiny random Qwen2, no downloads
    torchrun --standalone --nproc-per-node=2 launch/hf_finetune.py --model PATH --seq-len 32768 --out finetuned

Every rank holds the whole batch and keeps only its shard of the sequence; attention runs across
the ranks through ``ringrt.hf`` (``attn_implementation="ringrt"``). Each step::

    inputs = ringrt.hf.shard_inputs(batch, layout=sp.layout)                       # ids, positions, shifted labels
    logits = model(input_ids=..., position_ids=..., use_cache=False).logits        # (B, S / W, V) on each rank
    loss = ringrt.hf.sequence_loss(logits, inputs["shift_labels"])                 # whole sequence's mean, every rank
    loss.backward(); ringrt.hf.sum_gradients(model.parameters())                   # the full gradient, every rank
    optimizer.step()

so every rank takes the same step the one-process run would. With ``--check`` the first step's
loss and gradients are also computed on one process over the whole sequence and compared.

With ``--pack`` each step is one row of ``--batch`` x ``--seq-len`` tokens packed from whole
documents (each source file's first ``--max-doc-len`` tokens; one that does not fit is cut, its rest
starting the next row), and no token attends across a document: ``shard_inputs(...,
cu_seqlens=...)`` cuts each document on its own and returns ``cu_seq_lens_q/k``, which
``model(**inputs)`` forwards to the attention. ``--check`` then compares with each document run on
its own. Packed documents take no sliding window, so the tiny Qwen2 is built without one.

Without ``--model`` the model is a tiny random Qwen2 (biases; sliding-window layers) over
ringrt's byte tokens, and the text is the Python standard library's source. With ``--model PATH``
(a local ``save_pretrained`` directory; nothing is downloaded) the text is tokenized with the
model's ``tokenizer.json``. ``--out`` writes the result with ``save_pretrained`` into a new
directory (a temporary one renamed into place, so a crash never leaves a half-written model; an
existing ``--out`` is refused).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/hf_finetune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local Hugging Face model directory; default: a tiny random Qwen2")
    p.add_argument("--algorithm", default="tokenring", help="ringrt schedule (ringrt.ALGORITHMS)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (whole sequence, all ranks together)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="compare the first step with a one-process run of the whole sequence")
    p.add_argument("--out", default=None, help="save the fine-tuned model here (a new directory)")
    p.add_argument("--pack", action="store_true", help="train on packed documents: one row of --batch x --seq-len tokens per step")
    p.add_argument("--max-doc-len", type=int, default=200, help="with --pack: tokens kept of each document (source file)")
    args = p.parse_args(argv)
    for name in ("seq_len", "batch", "steps", "max_doc_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.out and os.path.exists(args.out):
        p.error(f"--out={args.out} exists; choose a new directory (nothing is overwritten)")
    return args


def tiny_qwen2(sliding: bool = True):
    """A tiny random Qwen2 over byte tokens: q/k/v biases, layers 2-3 with a 64-token sliding window (if ``sliding``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4096, use_sliding_window=sliding, sliding_window=64,
                      max_window_layers=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def load(args):
    """(model, tokenizer): the local model and its tokenizer, or the tiny Qwen2 and byte tokens."""
    from ringrt.data.tokenizer import ByteTokenizer, load_tokenizer

    torch.manual_seed(args.seed)
    if args.model is None:
        return tiny_qwen2(sliding=not args.pack), ByteTokenizer()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return model, load_tokenizer(str(Path(args.model) / "tokenizer.json"))


def batches(tok, seq_len: int, batch: int):
    """Endless (batch, seq_len) int64 batches over the standard library's source, the same on every rank."""
    from ringrt.data.batching import sequences
    from ringrt.data.corpus import stdlib_files

    while True:
        rows = []
        for seq in sequences(stdlib_files(), tok, seq_len):
            rows.append(seq)
            if len(rows) == batch:
                yield torch.stack(rows)
                rows = []


def packed_rows(tok, length: int, max_doc: int):
    """Endless (ids (1, length), cu_seqlens) over the standard library's files, each file's first
    ``max_doc`` tokens one document; a document that does not fit is cut, its rest begins the next row."""
    from ringrt.data.corpus import documents, stdlib_files

    ids: list[int] = []
    cu = [0]
    while True:
        for text in documents(stdlib_files()):
            doc = tok.encode(text)[:max_doc]
            while doc:
                take = doc[: length - len(ids)]
                ids += take
                cu.append(len(ids))
                doc = doc[len(take):]
                if len(ids) == length:
                    yield torch.tensor(ids, dtype=torch.int64)[None], torch.tensor(cu, dtype=torch.int32)
                    ids, cu = [], [0]


def step(model, batch, sp, cu_seqlens=None):
    """One forward and backward over this rank's shard; returns the loss of the whole sequence."""
    import ringrt.hf

    inputs = ringrt.hf.shard_inputs({"input_ids": batch}, layout=sp.layout, group=sp.group, cu_seqlens=cu_seqlens)
    if cu_seqlens is None:
        logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False).logits
    else:  # the document boundaries reach the attention as cu_seq_lens_q/k
        logits = model(**{k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "num_items_in_batch")},
                       use_cache=False).logits
    loss = ringrt.hf.sequence_loss(logits, inputs["shift_labels"], sp.group)
    loss.backward()
    ringrt.hf.sum_gradients(model.parameters(), sp.group)
    return loss.detach()


def check_first_step(model, batch, rank: int, cu_seqlens=None) -> str:
    """Loss and gradients of this step against the same model run on one process (sdpa attention);
    packed (``cu_seqlens``): each document run on its own."""
    import copy

    import torch.nn.functional as F

    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    ref.zero_grad(set_to_none=True)
    if cu_seqlens is None:
        logits = ref(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
    else:
        cu = cu_seqlens.tolist()
        total = sum(F.cross_entropy(ref(input_ids=batch[:, a:b], use_cache=False).logits[0, :-1].float(), batch[0, a + 1:b],
                                    reduction="sum") for a, b in zip(cu, cu[1:], strict=False) if b - a > 1)
        loss = total / sum(max(b - a - 1, 0) for a, b in zip(cu, cu[1:], strict=False))
    loss.backward()
    worst = max(((p.grad - r.grad).abs().max() / r.grad.abs().max().clamp_min(1e-30)).item()
                for p, r in zip(model.parameters(), ref.parameters(), strict=True) if r.grad is not None)
    return f"one-process loss {loss.item():.6f}; worst relative gradient difference {worst:.2e}"


def save(model, out: str) -> None:
    """save_pretrained into a temporary sibling, then rename it into place."""
    tmp = Path(f"{out}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    args = parse(argv)
    import ringrt.hf
    from ringrt.ops.layout import num_chunks

    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    model, tok = load(args)
    sp = ringrt.hf.patch(model, algorithm=args.algorithm)
    n = num_chunks(sp.layout, world)
    if args.seq_len % n and not args.pack:
        raise SystemExit(f"--seq-len={args.seq_len} must be a multiple of {n} (layout {sp.layout!r} over {world} ranks)")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {world} rank(s), "
        f"{args.algorithm}, layout {sp.layout}, " + (f"packed rows of {args.batch * args.seq_len} tokens (documents of at most "
        f"{args.max_doc_len})" if args.pack else f"{args.seq_len} tokens per sequence ({args.seq_len // world} per rank)"))
    data = packed_rows(tok, args.batch * args.seq_len, args.max_doc_len) if args.pack else ((b, None) for b in
                                                                                          batches(tok, args.seq_len, args.batch))
    t0 = time.perf_counter()
    for i in range(args.steps):
        batch, cu = next(data)
        opt.zero_grad(set_to_none=True)
        loss = step(model, batch, sp, cu)
        if i == 0 and args.pack:
            say(f"step 1: {len(cu) - 1} packed documents of {cu.diff().tolist()} tokens")
        if i == 0 and args.check:
            say(f"step 1 check: sequence-parallel loss {loss.item():.6f}; " + check_first_step(model, batch, rank, cu))
        opt.step()
        say(f"step {i + 1:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    if args.out and rank == 0:
        save(model, args.out)
        say(f"saved {args.out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
