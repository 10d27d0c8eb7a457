"""Counting host syncs without a GPU (test helper, not a test module).

On CUDA a host sync is the CPU waiting for the device: reading a value (`.item()`, `bool(t)`,
`int(t)`, `.tolist()`, `.cpu()`, `.numpy()`) or an op whose output shape depends on the data
(`nonzero`, `masked_select`, indexing with a boolean mask). On CPU none of these wait, but they
are the same calls: `HostSyncs` counts them, from the dispatcher for the ops and by wrapping the
reading methods, which on CPU never reach the dispatcher.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SHAPE_FROM_DATA = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                   aten.unique_consecutive.default, aten._unique2.default}
READERS = ("tolist", "cpu", "numpy")


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs() as syncs: ...` then `syncs.count` (and `syncs.seen`, the ops by name)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self._saved = {}

    @property
    def count(self) -> int:
        return len(self.seen)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))
        if func in SHAPE_FROM_DATA or bool_index:
            self.seen.append(str(func))
        return func(*args, **kwargs)

    def __enter__(self):
        for name in READERS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def reader(tensor, *args, _name=name, _original=original, **kwargs):
                self.seen.append(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, reader)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)
