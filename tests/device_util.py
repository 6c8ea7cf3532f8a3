"""Checking on a CPU box that a job keeps every tensor on its model's device.

The model and the job's device are put on ``meta`` (a device that is not the CPU, with real shape
kernels and no data); :class:`DeviceRecorder` watches every aten op of the job and records

* ``mixed``: ops whose tensor arguments and results (and random generators) span more than one
  device, the ops that raise "Expected all tensors to be on the same device" on a GPU: a CPU batch
  fed to a model on the GPU, a CPU loss total added to a GPU loss, a CPU index into a GPU tensor;
* ``reads``: reads of a meta tensor back to the host (``.item()``, ``.tolist()``, ``.cpu()``),
  answered with zeros (flags: True) so the job runs to its end; on a GPU each is a host sync.

Explicit transfers (``.to(device)``, ``copy_`` between devices) are what moving data looks like and
are not "mixed".
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
META = torch.device("meta")
_TRANSFERS = (aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default)


def _answer(dtype: torch.dtype):
    """What a host read of a meta tensor returns: True for flags (the data-dependent input checks
    then pass), else zero."""
    return True if dtype == torch.bool else 0 if not dtype.is_floating_point else 0.0


class DeviceRecorder(TorchDispatchMode):
    """``with DeviceRecorder() as rec: ...``; then ``rec.mixed``, ``rec.reads``, ``rec.on_meta``."""

    def __enter__(self):
        import torch.fx.experimental._config as fx_config

        # boolean-mask indexing on meta: pretend every element is selected (shapes only matter here)
        self._nonzero = fx_config.meta_nonzero_assume_all_nonzero
        fx_config.meta_nonzero_assume_all_nonzero = True
        return super().__enter__()

    def __exit__(self, *exc):
        import torch.fx.experimental._config as fx_config

        fx_config.meta_nonzero_assume_all_nonzero = self._nonzero
        return super().__exit__(*exc)

    def __init__(self):
        super().__init__()
        self.mixed: list[tuple[str, list[str]]] = []
        self.reads: list[str] = []
        self.on_meta = 0  # ops that ran on meta tensors: proves the job really ran there

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if func in (aten._local_scalar_dense.default, aten.is_nonzero.default) and args[0].is_meta:
            self.reads.append(str(func))
            return _answer(args[0].dtype) if func is aten._local_scalar_dense.default else True
        if func is aten._to_copy.default and args[0].is_meta and torch.device(kwargs.get("device") or "meta").type != "meta":
            self.reads.append(str(func))
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype, device=kwargs["device"])
        if func is aten.copy_.default and args[1].is_meta and not args[0].is_meta:
            self.reads.append(str(func))
            return args[0]
        out = func(*args, **kwargs)
        if func in _TRANSFERS:
            return out
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        devices = {str(t.device) for t in tensors + outs} | {str(g.device) for g in flat if isinstance(g, torch.Generator)}
        if len(devices) > 1:
            self.mixed.append((str(func), sorted(devices)))
        if any(t.is_meta for t in tensors + outs):
            self.on_meta += 1
        return out

    def check(self, *, min_ops: int = 1) -> None:
        """AssertionError naming the first mixed ops, or when nearly nothing ran on meta."""
        assert not self.mixed, f"{len(self.mixed)} ops mix devices, first: {self.mixed[:5]}"
        assert self.on_meta >= min_ops, f"only {self.on_meta} ops ran on the model's device"


class MetaGenerator(torch.Generator):
    """A CPU generator that reports the device it was asked for: stands in for ``torch.Generator``
    where a job asks for one on ``meta`` (no such generator exists), so the device it asked for is
    what the recorder sees next to the tensors it draws for."""

    def __new__(cls, device="cpu"):
        return super().__new__(cls)

    def __init__(self, device="cpu"):
        super().__init__()
        self.asked = torch.device(device)

    @property
    def device(self):
        return self.asked
