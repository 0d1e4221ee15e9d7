"""Find where the host waits for the device: a dispatch mode that records every operation that reads a
device value back (`.item()`, `bool(t)`, `nonzero`, boolean-mask indexing, `.tolist()`), with the line of
minidino that asked for it.

    with HostSyncs() as syncs:
        train.train_step(...)
    print(syncs.places)     # Counter({'train.py:321 train_step': 1, 'minidino/losses.py:88 ibot_loss': 1})

On a GPU each of them stalls the CPU until the queued kernels finish, so the host cannot run ahead, and
none may happen inside a CUDA graph. The mode works on any device, so a CPU run shows the places a GPU run
would wait at (an upper bound: a value that happens to live on the CPU in a GPU run costs nothing).
`benchmarks/step.py --syncs` counts them for one training step.

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import collections
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
READ_BACK = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.masked_select}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def caller() -> str:
    """The innermost frame on the stack that is neither torch's nor this file's: the line that asked."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if not (
            path.startswith(TORCH) or path == os.path.abspath(__file__) or frame.filename.startswith("<")
        ):
            shown = os.path.relpath(path, ROOT) if path.startswith(ROOT) else path
            return f"{shown}:{frame.lineno} {frame.name}"
    return "unknown"


def reads_back(func, args, kwargs) -> bool:
    """Operations whose output size depends on tensor values: boolean-mask indexing and assignment, and
    repeat_interleave with tensor repeats and no `output_size`."""
    if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if func.overloadpacket is aten.repeat_interleave and func._overloadname in ("Tensor", "self_Tensor"):
        return kwargs.get("output_size") is None
    return False


class HostSyncs(TorchDispatchMode):
    """Counts the read-backs of the operations run inside it, by place (`places`, a Counter)."""

    def __init__(self):
        super().__init__()
        self.places: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in READ_BACK or reads_back(func, args, kwargs):
            self.places[caller()] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist

        def tolist(t):  # not an operator (no dispatch): patched for the duration
            self.places[caller()] += 1
            return self._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    @property
    def count(self) -> int:
        return sum(self.places.values())
