"""Any Hugging Face decoder, sequence-parallel: ringrt as a transformers attention backend.

::

    import ringrt.hf
    model = AutoModelForCausalLM.from_pretrained(path)           # or from_config
    sp = ringrt.hf.patch(model, algorithm="tokenring")           # every rank, same arguments
    inputs = ringrt.hf.shard_inputs(batch, layout=sp.layout)     # this rank's tokens, positions, labels
    logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False).logits
    loss = ringrt.hf.sequence_loss(logits, inputs["shift_labels"])  # the whole sequence's mean, every rank
    loss.backward(); ringrt.hf.sum_gradients(model.parameters())     # the full gradient on every rank

Packed documents (one row, e.g. ``transformers.DataCollatorWithFlattening``): ``shard_inputs`` also
returns ``cu_seq_lens_q/k``; pass everything, ``model(**inputs, use_cache=False)``, and no token
attends across a document boundary (docs/hf.md, "Packed documents").

``import ringrt.hf`` also registers ``attn_implementation="ringrt"`` with transformers, so
``from_pretrained(..., attn_implementation="ringrt")`` works (default settings: tokenring, zigzag
shards, or contiguous ones for models with sliding windows).

Read: ``settings.py`` (:func:`patch`, the settings), ``backend.py`` (the attention function and
what it refuses), ``inputs.py`` (:func:`shard_inputs`).
"""

from ..model.parallel import sequence_loss, sum_gradients
from .backend import attention_forward, register
from .inputs import shard_inputs
from .settings import NAME, SequenceParallel, has_sliding_layers, patch, settings_of

register()

__all__ = ["NAME", "SequenceParallel", "attention_forward", "has_sliding_layers", "patch", "register", "sequence_loss", "settings_of",
           "shard_inputs", "sum_gradients"]
