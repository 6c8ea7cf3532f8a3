"""The Llama-family decoder, the attention it is given on a sharded sequence, Hugging Face loading/saving.

Read first: ``llama.py`` (the model, top to bottom; it never touches ``torch.distributed``),
``parallel.py`` (sharding a batch, the injected sequence-parallel attention, the loss over the whole
sequence, the gradient all-reduce). Then ``config.py`` (model and attention settings), ``hf.py``
(safetensors checkpoints in Hugging Face's layout), ``kvcache.py`` (the sharded decode cache).

May import: ``ringrt.api``, ``ringrt.schedules``, ``ringrt.lm_infinite``, ``ringrt.run``,
``ringrt.distributed``, ``ringrt.ops``. Never data, compression, jobs, engines or the tools.
"""
