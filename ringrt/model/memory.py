"""How many bytes one sequence's forward + backward holds per token and rank. Pure arithmetic.

Note [activation memory]
~~~~~~~~~~~~~~~~~~~~~~~~
Per token of this rank's shard (B = 1), with h = hidden, H = heads, K = kv heads, D = head_dim,
I = intermediate, V = vocab, L = layers, e = bytes of the activation dtype, a = bytes of the
accumulators (4, or 8 for fp64), c = loss chunk (tokens), S = tokens per rank. Counted in elements
of e bytes unless marked a::

    block saved     = 6h + (2H + 2K)D + 4I + H[a]   two RMSNorms (input, normalised, output: 3h each),
                                                    q, k, v, out and lse of the attention (Note [Λ-mask
                                                    saved tensors]), the SwiGLU's gate, silu, up, product
    attn backward   = 6HD + 6KD + 4D  (+ H[a])      the Λ backward's working set: dout, q, k, v heads-first,
                                                    the three rotated inputs, fp32 dq/dk/dv of the five
                                                    ring inputs, its RoPE tables
    head            = 3h + (3cV[a] / S if chunked else 3V[a])   final norm; logits, softmax, grad
                                                                (only c rows of them when chunked)

    no checkpointing:  L * block saved + head + attn backward + 2h
    checkpointing:     L * h + (block saved - 4I) + attn backward + head + 2h

With checkpointing a block keeps only its input (h); in the backward one block at a time is run
again, its MLP in slices of ``llama.MLP_SLICE`` tokens (so the 4I term is one slice's, not the
shard's), and the attention's working set comes on top. 2h: the gradient flowing between blocks
and the residual's. Dense causal attention (TokenRing) keeps q, k, v, out, lse the same way; its
working set is counted with the same term.

Demo model (h 128, H 4, K 2, D 32, I 384, V 259, L 4, fp32): block saved 10.77 KB, attn backward
5.1 KB; no checkpointing, full logits: 53.9 KB per token; checkpointing + chunk 4096 at S = 512K:
14.4 KB per token, 7.0 GiB of activations per rank for a million tokens on two ranks. Measured
(``ringrt bench scale``, peak RSS - RSS before the pass): 0.83 to 1.0 x the count from 16K to 256K tokens.
What is not counted: the weights, gradients and optimizer state (a few MB here), the process's
own ~0.3 GiB, allocator slack and the transient tensors of a single kernel call (a tile of scores,
``block_size`` x (n_local + block_size)), which do not grow with S.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def activation_bytes_per_token(cfg: ModelConfig, *, checkpointing: bool, loss_chunk: int, tokens_per_rank: int,
                               dtype: torch.dtype = torch.float32, dense: bool = False) -> float:
    """Bytes per token of this rank's shard one fwd+bwd holds at its peak (Note [activation memory]).

    ``loss_chunk``: tokens per LM-head/loss chunk, 0 = the full logits; ``tokens_per_rank``: S;
    ``dense``: exact causal attention instead of the Λ-mask (same count). Multiply by S for bytes.
    """
    e = torch.empty((), dtype=dtype).element_size()
    a = 8 if dtype == torch.float64 else 4
    h, heads, kv, d, inter, vocab = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.hidden_size, cfg.vocab_size
    block = (6 * h + (2 * heads + 2 * kv) * d + 4 * inter) * e + heads * a
    attn_bwd = (6 * heads * d + 6 * kv * d + 4 * d) * e + heads * a
    rows = min(loss_chunk, tokens_per_rank) if loss_chunk > 0 else tokens_per_rank
    head = 3 * h * e + 3 * rows * vocab * a / tokens_per_rank
    flowing = 2 * h * e
    if checkpointing:
        return cfg.n_layers * h * e + (block - 4 * inter * e) + attn_bwd + head + flowing
    return cfg.n_layers * block + attn_bwd + head + flowing
