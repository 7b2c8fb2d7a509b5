"""Peak tensor memory of a piece of code, on any device, counted at the dispatcher.

Every tensor an operator returns is recorded by its storage; the storage's bytes count until it is
freed. Tensors alive before the measurement (parameters, optimizer state, data) are counted from
the start when passed as ``baseline``. This sees exactly what PyTorch allocates for tensors,
without allocator caching, so CPU numbers are comparable with CUDA ones.

Example:
    >>> import torch
    >>> x = torch.zeros(1000)
    >>> with PeakMemory(baseline=[x]) as mem:
    ...     y = x + 1
    ...     del y
    ...     z = x * 2
    >>> mem.peak_bytes == 2 * 4000
    True
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory(TorchDispatchMode):
    def __init__(self, baseline=()):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak_bytes = 0
        for t in baseline:
            self._track(t)

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
        except (RuntimeError, NotImplementedError):  # wrappers without storage (torch.func transforms):
            return  # their data is allocated, and counted, by the ops on the wrapped tensors
        if key == 0:
            return
        if key in self._live or st.nbytes() == 0:
            return
        self._live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key):
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t)
        return out


def optimizer_tensors(opt) -> list[torch.Tensor]:
    """An optimizer's state tensors: in ``opt.state`` and, as ivon-opt keeps them, in its groups."""
    out = [v for g in opt.param_groups for k, v in g.items() if k != "params" and torch.is_tensor(v)]
    for st in opt.state.values():
        if isinstance(st, dict):
            out += [v for v in st.values() if torch.is_tensor(v)]
        elif torch.is_tensor(st):
            out.append(st)
    return out


def measure_step(step, model, opt, batch=()):
    """Run ``step()`` once under :class:`PeakMemory`, counting the model's parameters, the
    optimizer's state and ``batch`` from the start. Returns (step's result, peak bytes). Compiled
    (fused) kernels cannot run under a dispatch mode, so an optimizer with ``fused`` is measured on
    its eager path, which allocates at least what the fused kernels do."""
    fused = getattr(opt, "fused", False)
    if fused:
        opt.fused = False
    try:
        with PeakMemory([*model.parameters(), *optimizer_tensors(opt), *batch]) as mem:
            out = step()
    finally:
        if fused:
            opt.fused = True
    return out, mem.peak_bytes
