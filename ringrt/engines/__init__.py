"""Opt-in engines that own the parameters and optimizer around sequence-parallel attention.

Read ``deepspeed.py``: DeepSpeed ZeRO (stages 1-3) over the (data x sequence) mesh, the same model,
data order, loss and learning-rate schedule as ``ringrt.jobs.train``.

May import: ``ringrt.jobs`` (its configs and checks) and every package below it. No job imports an
engine: ``launch/train.py`` picks one (``engine=deepspeed``), and only the run configs
(``ringrt.runs``) name its settings.
"""
