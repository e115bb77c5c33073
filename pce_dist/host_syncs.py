"""Count device->host synchronisations by instrumentation, on any device.

Why not ``torch.cuda.set_sync_debug_mode``: it only exists on CUDA, and the CPU box is
where tests run. A host sync is a moment where Python needs a value that lives in a
tensor, or where an op's output shape depends on the tensor's values; on a GPU both stall
the host until the device catches up, block CUDA graphs and break ``torch.compile``
graphs. ``HostSyncCounter`` sees both kinds where they happen, whatever the device:

  * at the ATen dispatcher (a ``TorchDispatchMode``): ``_local_scalar_dense`` (``.item()``,
    ``bool(t)``, ``int(t)``, and C++ code that reads a scalar, e.g. ``F.one_hot``'s index
    check), ops whose output size is data-dependent (``nonzero``, ``masked_select``,
    ``unique``, ``repeat_interleave`` without ``output_size``, indexing with a boolean mask),
    and copies from a non-CPU device to the CPU;
  * at the Python API (a ``TorchFunctionMode``): ``Tensor.tolist`` and ``Tensor.numpy``,
    which read memory without going through the dispatcher.

Each event counts once. ``benchmarks/gpu.py`` checks the count against CUDA's own sync
detector where a GPU exists.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# ops whose output size depends on the values of their input: the host must read them
_DATA_DEPENDENT_SHAPE = {
    _aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default, _aten.unique_dim.default,
    _aten.unique_consecutive.default, _aten._unique.default,
}
_PYTHON_READS = {torch.Tensor.tolist, torch.Tensor.numpy}


def _is_sync(func, args, kwargs) -> str | None:
    """The name of the sync ``func(*args, **kwargs)`` performs, or None."""
    if func is _aten._local_scalar_dense.default:
        return "item"
    if func in _DATA_DEPENDENT_SHAPE:
        return func.__name__
    if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave"
    if func is _aten.index.Tensor:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype == torch.bool for i in indices):
            return "index_bool_mask"
    if func in (_aten._to_copy.default, _aten.copy_.default):
        src = args[1] if func is _aten.copy_.default else args[0]
        dst_device = args[0].device if func is _aten.copy_.default else kwargs.get("device")
        if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_device is not None \
                and torch.device(dst_device).type == "cpu":
            return "copy_to_host"
    return None


class _Dispatch(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _is_sync(func, args, kwargs)
        if name is not None:
            self.counts[name] += 1
        return func(*args, **kwargs)


class _Python(TorchFunctionMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PYTHON_READS:
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """``with HostSyncCounter() as syncs: step()`` -> ``syncs.total``, ``syncs.by_kind``.

    Covers the forward, the backward (autograd runs its ops through the same dispatcher
    on this thread) and anything else run inside the block. Slows ops down (Python per op):
    count, don't time, under it.
    """

    def __init__(self) -> None:
        self.by_kind: Counter = Counter()
        self._modes = (_Python(self.by_kind), _Dispatch(self.by_kind))

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
