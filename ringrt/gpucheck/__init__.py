"""``ringrt gpucheck``: the GPU acceptance check, one command on a GPU machine.

On one GPU: every block-kernel path against independent references (fp16/bf16/fp32, masks with
odd widths and empty rows, GQA/MQA, lengths that are not multiples of 8 or 32), a short training
and evaluation of the demo model, and the kernel's FLOP/s as a fraction of the device's peak. With
two or more GPUs also ``ringrt probe`` under torchrun and every schedule (and the Λ-mask ring)
against a single-process fp64 reference over NCCL. One verdict line, and a JSON file.

Without CUDA it prints a SKIP line and exits 0; ``--device cpu`` runs the same checks on the CPU
(gloo, the CPU kernel), which is how the command itself is tested.

Read first: ``cli.py`` (the command and its verdict), ``kernels.py`` (kernel vs references), then
``reference.py`` (the plain references), ``throughput.py`` (FLOP/s and peaks), ``ranks.py``
(schedules over several ranks).

A tool: may import any ringrt package; nothing but the command line (``ringrt.cli``) and the other
tools imports it (``tests/test_architecture.py``).
"""
