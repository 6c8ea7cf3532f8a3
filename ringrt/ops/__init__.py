"""Math on one device: never ``torch.distributed``.

``kernels.py`` the block kernels (CPU, math, and the protocol; ``kernels_cuda.py`` / ``flash.py``
load only on CUDA), ``kernel_layout.py`` the aligned tensors CUDA kernels want, ``merge.py`` folding
partial (out, lse) results, ``rope.py`` rotary embeddings, ``layout.py`` how a sequence is sharded
(contiguous / zigzag chunk ids), ``timing.py`` device-synchronised wall clocks.

May import: torch and the standard library only (and each other).
"""
