"""Math on one device: block kernels, merging partial results, rotary embeddings, sequence layouts.

Read first: ``kernels.py`` (the block-kernel protocol, the CPU and math kernels; ``kernels_cuda.py``
and ``flash.py`` load only on CUDA), ``merge.py`` (folding partial (out, lse) results in fp32),
``layout.py`` (how a sequence is cut into contiguous / zigzag shards). Then ``kernel_layout.py``
(the aligned tensors CUDA kernels want), ``lse_grad.py`` (a kernel adapter for backward passes
whose delta carries a gradient of the lse), ``rope.py`` (rotary embeddings), ``timing.py``
(device-synchronised wall clocks).

May import: torch and the standard library only; never ``torch.distributed`` and no other ringrt
package (communication is injected from above). Enforced by ``tests/test_architecture.py``.
"""
