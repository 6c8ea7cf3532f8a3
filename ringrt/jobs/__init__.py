"""Jobs: train, eval, generate, probe and the embedded demo. Each is ``run_<job>(cfg) -> result``.

Read first: ``train.py`` (the trainer: mesh, step, checkpoints, resume), ``eval.py`` (perplexity by
length, vanilla and Λ-mask, and passkey retrieval; ``stream_eval.py``: one Λ-mask sequence far longer
than memory, streamed per rank segment), ``generate.py`` (sharded prefill, then decoding
with a sharded KV cache). Then ``config.py`` (the jobs' dataclasses), ``flags.py`` (command-line
flags from those dataclasses), ``demo.py`` (``ringrt demo``), ``probe.py`` (``ringrt probe``: check a
distributed launch), ``interrupt.py`` (Ctrl-C and what to run to resume), ``passkey.py``.

May import: ``ringrt.compression`` (with ``compression.enabled`` a job hands over to its
compression variant) and every package below it (data, model, api, schedules, lm_infinite, run,
distributed, ops). Never engines or the tools. Enforced by ``tests/test_architecture.py``.
"""
