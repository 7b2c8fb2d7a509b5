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

import contextlib
import os
import re
import sys
import tempfile
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


# what torch's profiler itself writes to stderr around a profiled call: kineto's start/stop lines and
# the CPU allocator's note on blocks allocated before profiling (they are not in the count anyway)
_CHATTER = re.compile(
    r"SyncActivityProfilerHandler|Memory block of unknown size was allocated before the profiling"
)


@contextlib.contextmanager
def _without_profiler_chatter():
    """Keep the profiler's own log lines off stderr (the bench measures one step per run with it);
    anything else written to stderr meanwhile, by Python or C++, is passed on after the call."""
    fd = 2  # the file descriptor, which C++ writes to whatever ``sys.stderr`` is
    try:
        os.fstat(fd)
    except OSError:  # no stderr at all
        yield
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().splitlines(keepends=True)
            kept = b"".join(line for line in lines if not _CHATTER.search(line.decode(errors="replace")))
            if kept:
                os.write(fd, kept)


def _memory_timeline():
    """(Action, MemoryProfile) from torch's private profiler module, or None in a torch without it."""
    try:
        from torch.profiler._memory_profiler import Action, MemoryProfile
    except ImportError:
        return None
    return Action, MemoryProfile


def profiled_peak(fn, device: str | torch.device = "cpu", baseline=()):
    """Run ``fn()`` under torch's profiler with memory recording and return (its result, the peak of
    tensor bytes on ``device`` during the call), or (result, None) where this torch lacks the
    profiler's memory timeline (a private module). Unlike :class:`PeakMemory` it sees compiled
    (inductor) code, whose buffers never pass the dispatcher. Tensors alive before the call count
    if they are in ``baseline`` or an eager op of the call touches them (a compiled kernel's
    inputs alone are not seen: pass them as ``baseline``)."""
    timeline_api = _memory_timeline()
    if timeline_api is None:
        return fn(), None
    Action, MemoryProfile = timeline_api
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    storages = {}
    for t in baseline:
        if isinstance(t, torch.Tensor) and t.device == device and t.untyped_storage().data_ptr():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with _without_profiler_chatter(), torch.profiler.profile(
        activities=acts, profile_memory=True, record_shapes=True
    ) as prof:
        out = fn()
    timeline = MemoryProfile(prof.profiler.kineto_results).timeline
    current = peak = sum(storages.values())
    for _, action, (key, _), nbytes in timeline:
        if key.device != device:
            continue
        storage = getattr(key, "storage", None)  # (allocations without a tensor have none)
        if action == Action.PREEXISTING and storage is not None and storage.ptr in storages:
            continue  # counted from the start
        if action in (Action.PREEXISTING, Action.CREATE):
            current += nbytes
        elif action == Action.DESTROY:
            current -= nbytes
        peak = max(peak, current)
    return out, peak


def measure_step(step, model, opt, batch=()):
    """Run ``step()`` once and return (step's result, peak tensor bytes during it), counting the
    model's parameters, the optimizer's state and ``batch`` from the start. An optimizer with
    ``fused`` (compiled kernels, which a dispatch mode cannot see) is measured on its compiled path
    with :func:`profiled_peak`; where that is unavailable, with :class:`PeakMemory`, under which
    BayesAdam runs the kernels' math uncompiled (at least the compiled kernels' allocations)."""
    params = list(model.parameters())
    base = [*params, *optimizer_tensors(opt), *batch]
    if getattr(opt, "fused", False) and _memory_timeline() is not None:  # (the step runs once)
        return profiled_peak(step, params[0].device if params else "cpu", base)
    with PeakMemory(base) as mem:
        out = step()
    return out, mem.peak_bytes
