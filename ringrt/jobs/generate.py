"""``ringrt generate``: sharded prefill of a long prompt, then token-by-token decoding with a
sharded KV cache (``ringrt/model/kvcache.py``); greedy or temperature / top-k sampling. Every rank
ends with the same tokens: the merged decode outputs are bit-identical across ranks and sampling
uses one seeded generator per rank, on the model's device (:func:`ringrt.distributed.device.job_device` unless a
model is given), where the prompt, the cache and every decoded token live too. The command prints
the prompt followed by its continuation (:func:`shown`).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from ..distributed import device as devices
from ..data.tokenizer import check_tokenizer, load_tokenizer
from ..ops.layout import num_chunks, pad_to_multiple
from ..model.hf import load_pretrained
from ..model.kvcache import LambdaPrefillCache, ShardedKVCache
from ..model.parallel import group_sum, make_attend, shard_batch
from ..run.rundir import resolve_checkpoint
from .config import GenerateConfig, GenerateJobConfig
from .flags import add_dataclass_arguments, build


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _next_token(logits: torch.Tensor, g: GenerateConfig, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> (B,) token ids; ``gen`` (on the logits' device) draws when ``g.temperature > 0``."""
    if g.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.double() / g.temperature
    if g.top_k > 0:
        kth = logits.topk(min(g.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompt: torch.Tensor, g: GenerateConfig, *, attention=None, train_len: int = 0,
                 eos_id: int | None = None) -> torch.Tensor:
    """prompt (B, P) int64 -> (B, max_new_tokens) new tokens (fewer if every row hit ``eos_id``),
    on the model's device.

    The prompt (any device) is sharded over the default group (padded at the end to what the layout
    needs; padding never enters the cache) and moved to the model's device; ``attention`` is an
    :class:`AttentionConfig` (default ring, zigzag).
    """
    from ..model.config import AttentionConfig

    attn = attention or AttentionConfig()
    B, P = prompt.shape
    if P < 1:
        raise ValueError("the prompt is empty: give generate.prompt or generate.prompt_file")
    if P > g.max_prompt_tokens:
        raise ValueError(f"the prompt has {P} tokens, more than generate.max_prompt_tokens={g.max_prompt_tokens}")
    world, layout = _world(), attn.resolved_layout()
    padded = pad_to_multiple(prompt, num_chunks(layout, world), dim=1)
    tokens = torch.cat([padded, padded[:, -1:]], dim=1)  # (B, P_pad + 1): shard_batch wants one extra target
    device = devices.module_device(model)
    sh = shard_batch(tokens, layout=layout, device=device)
    prefill = make_attend(attn, model.config, train_len=train_len or P, group=None)
    if attn.lambda_mask:  # Λ-mask: bounded cache (first n_global + last n_local tokens) on every rank
        cache = LambdaPrefillCache(n_layers=model.config.n_layers, prefill_attend=prefill, mask=prefill.mask,
                                   rope_theta=model.config.rope_theta, real_len=P)
    else:
        cache = ShardedKVCache(n_layers=model.config.n_layers, prefill_attend=prefill, real_len=P)
    hidden = model(sh.input_ids, positions=sh.positions, attend=cache, hidden_only=True)  # (B, S_local, dim)
    last = (sh.positions == P - 1).to(hidden.dtype)  # (S_local,) one-hot on the rank holding the last prompt token
    h = group_sum(torch.einsum("bsd,s->bd", hidden, last))  # (B, dim)
    logits = model.lm_head(h).float()  # (B, V)
    cache.advance()
    gen = torch.Generator(device=device).manual_seed(g.seed) if g.temperature > 0 else None  # sampling only
    out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(g.max_new_tokens):
        nxt = _next_token(logits, g, gen)  # (B,)
        out.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        if t + 1 == g.max_new_tokens:
            break
        pos = torch.tensor([P + t], device=device)  # (1,)
        logits = model(nxt[:, None], positions=pos, attend=cache)[:, -1].float()  # (B, V)
        cache.advance()
    return torch.stack(out, dim=1)


ECHO_CHARS = 1000
"""The prompt is echoed before its continuation up to this many characters (its end, when longer)."""


def shown(prompt: str, continuation: str, limit: int = ECHO_CHARS) -> str:
    """What ``ringrt generate`` prints: the prompt, then its continuation straight after it, as the
    text reads; a prompt longer than ``limit`` characters is cut to its last ``limit``, behind a
    ``[... N characters of the prompt not shown ...]`` line."""
    if len(prompt) > limit:
        prompt = f"[... {len(prompt) - limit} characters of the prompt not shown ...]\n" + prompt[-limit:]
    return prompt + continuation


def run_generate(cfg: GenerateJobConfig, model=None) -> dict:
    """Generate from ``cfg.generate.prompt`` (or ``prompt_file``); returns {"prompt", "prompt_tokens",
    "text" (the continuation only), "ids"}."""
    g = cfg.generate
    if g.max_new_tokens < 1:
        raise ValueError(f"generate.max_new_tokens={g.max_new_tokens} must be a positive integer")
    if g.temperature < 0 or g.top_k < 0:
        raise ValueError(f"generate.temperature={g.temperature} and generate.top_k={g.top_k} must be >= 0")
    hf_dir, extra = resolve_checkpoint(g.checkpoint)
    tok = load_tokenizer(cfg.data.tokenizer if cfg.data.tokenizer is not None else extra.get("tokenizer"))
    if model is None:
        model = load_pretrained(hf_dir).to(devices.job_device())
    model.eval()
    check_tokenizer(tok, model.config)
    text = open(g.prompt_file, encoding="utf-8").read() if g.prompt_file else g.prompt
    ids = torch.tensor([tok.encode(text)], dtype=torch.int64)
    from .train import autocast_for

    with autocast_for(g.precision, devices.module_device(model))():
        new = generate_ids(model, ids, g, attention=cfg.attention, train_len=extra.get("train_len", 0), eos_id=tok.eos_id)
    return {"prompt": text, "prompt_tokens": ids.shape[1], "ids": new[0].tolist(), "text": tok.decode(new[0].tolist())}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(p, GenerateJobConfig)


def main(args: argparse.Namespace) -> int:
    from ..distributed.launcher import init_distributed

    from .interrupt import stops_cleanly

    cfg = build(GenerateJobConfig, args)
    with stops_cleanly("generation"):
        init_distributed()
        out = run_generate(cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(shown(out["prompt"], out["text"]), flush=True)
    return 0
