"""Published measurements the cost model must reproduce qualitatively (simulation of their setups).

* ring-flash-attention README table: 8 x H800 / A100, Llama-3.1-8B attention (32 query heads,
  8 K/V heads, head_dim 128, bf16), 8K tokens per GPU, causal, forward + backward, efficiency =
  single-GPU time of the whole sequence / (8 x parallel time): zigzag ring ~ 0.85-0.90, plain
  (contiguous) ring ~ 0.52.
* TokenRing paper's trace: 4 x A10 over a PCIe switch, 24K tokens, 32 heads x 128, MHA, fp16:
  ~3.5 ms per step for TokenRing's communication vs ~7.6 ms for the KV-ring's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schedules import costmodel as cm


@dataclass(kw_only=True, slots=True)
class Anchor:
    name: str
    value: float
    band: tuple[float, float]
    published: str

    @property
    def ok(self) -> bool:
        return self.band[0] <= self.value <= self.band[1]


def ring_flash_attention_table(machine: str) -> list[Anchor]:
    m = cm.PRESETS[machine]
    p = cm.Problem(seq=8 * 8192, heads=32, kv_heads=8, head_dim=128, dtype_bytes=2, causal=True, backward=True)
    single = cm.single_device(p, m)
    zig = cm.estimate("ring", p, m, 8).total
    plain = cm.estimate("ring", cm.Problem(**{**_fields(p), "layout": "contiguous"}), m, 8).total
    return [
        Anchor(name=f"{machine}: zigzag ring efficiency", value=single / (8 * zig), band=(0.80, 0.95), published="0.85-0.90"),
        Anchor(name=f"{machine}: plain ring efficiency", value=single / (8 * plain), band=(0.45, 0.60), published="~0.52"),
    ]


def tokenring_a10_trace() -> list[Anchor]:
    m = cm.PRESETS["a10"]
    p = cm.Problem(seq=24 * 1024, heads=32, kv_heads=32, head_dim=128, dtype_bytes=2, causal=False)
    tr = cm.estimate("tokenring", p, m, 4)
    kv = cm.estimate("ring", p, m, 4)
    tr_step = max(c for _, c in tr.steps[1:])
    kv_step = max(c for _, c in kv.steps[:-1])
    return [
        Anchor(name="A10 PCIe: TokenRing comm per step (ms)", value=tr_step * 1e3, band=(2.8, 4.2), published="~3.5"),
        Anchor(name="A10 PCIe: KV-ring comm per step (ms)", value=kv_step * 1e3, band=(6.1, 9.1), published="~7.6"),
        Anchor(name="A10 PCIe: KV-ring / TokenRing comm", value=kv_step / tr_step, band=(1.7, 2.6), published="~2.2"),
    ]


def all_anchors() -> list[Anchor]:
    return ring_flash_attention_table("h800") + ring_flash_attention_table("a100") + tokenring_a10_trace()


def _fields(p: cm.Problem) -> dict:
    return {f: getattr(p, f) for f in p.__slots__}
