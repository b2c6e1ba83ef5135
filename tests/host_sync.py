"""CPU guards for code that must run inside a CUDA graph: no host sync, and the same work at every replay.

- `forbid_host_sync(mp)`: makes the torch calls that synchronize with the host on CUDA raise (`mp.undo()` lifts
  it): reading values (`item`, `tolist`, `numpy`, `cpu`, `bool`/`int`/`float`/`index` of a tensor, `any`/`all` as
  Python truth), data-dependent sizes (`nonzero`, `unique`, `masked_select`, `isin`) and boolean-mask indexing.
- `graph_trace(mp)`: a context manager that applies `forbid_host_sync` and a `TorchDispatchMode` that sees every
  aten op, also those that composite C++ ops call (an `item()` inside C++ shows as `_local_scalar_dense`, which no
  Python patch sees). It raises on the ops that read tensor values on the host or give data-dependent shapes
  (`_local_scalar_dense`, `nonzero`, `masked_select`, `unique`, the overloads whose CUDA kernels read a tensor
  argument on the host (`index_fill_`/`masked_fill_` with a tensor value, `repeat_interleave` without
  `output_size`), and `lift_fresh`: a tensor made from host data, which a graph would bake in), and records the trace a CUDA graph would bake: per op, its name, its non-tensor
  arguments (Python numbers in a launch are frozen at capture) and, for each tensor argument made before the
  traced region, its address, shape, strides and dtype; tensors made inside the region are recorded by shape only
  (in a graph they come from the graph's private pool, at the same address at every replay). Triton launches
  (under `TRITON_INTERPRET=1`) are recorded as one op with the kernel's name, grid and arguments, and run with the
  guard paused (the interpreter copies its arguments to and from host buffers itself).
  Two runs of one code path replay correctly from one capture when their traces are equal: same ops, same frozen
  Python values, the same persistent tensors, and no input that is not persistent.
- `allow_lagged_reads(mp)`: under `forbid_host_sync`, lets `LaggedRead` read its host snapshots. That is what
  "no blocking host sync" allows on the host-side step paths (`begin_step`, the working-set report): on CUDA a
  snapshot is pinned host memory that a non-blocking copy filled a step or more earlier, read once its event has
  completed (or, with `depth` snapshots in flight, after waiting for the oldest), never for work queued since; on
  the CPU the guard cannot tell that buffer from device memory, so it is told. Every other read of tensor values still raises.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

_PAUSED = [0]  # > 0 while a Triton kernel is interpreted: the guards let its own bookkeeping through

_FORBIDDEN_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                  "lift_fresh", "lift_fresh_copy", "is_nonzero", "equal")
# Overloads whose CUDA implementation reads a tensor argument on the host (the CPU kernels read it directly, so no
# `_local_scalar_dense` shows): a tensor fill value, or the output size of `repeat_interleave`.
_SYNCING_OVERLOADS = ("index_fill_.int_Tensor", "index_fill.int_Tensor", "masked_fill_.Tensor", "masked_fill.Tensor")


def forbid_host_sync(mp: pytest.MonkeyPatch) -> None:
    """Make the torch calls that synchronize with the host on CUDA raise (see the module docstring)."""

    def forbid(name, original):
        def raiser(*args, **kwargs):
            if _PAUSED[0]:
                return original(*args, **kwargs)
            raise AssertionError(f"{name} called on the sync-free path")
        return raiser

    for name in ("item", "tolist", "numpy", "cpu", "nonzero", "unique", "__bool__", "__int__", "__float__",
                 "__index__", "any", "all"):
        mp.setattr(torch.Tensor, name, forbid(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for name in ("nonzero", "unique", "unique_consecutive", "masked_select", "isin"):
        mp.setattr(torch, name, forbid(f"torch.{name}", getattr(torch, name)))
    for method in ("__getitem__", "__setitem__"):
        original = getattr(torch.Tensor, method)

        def guarded(self, index, *rest, _original=original, _method=method):
            parts = index if isinstance(index, tuple) else (index,)
            if not _PAUSED[0] and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
                raise AssertionError(f"boolean-mask {_method} on the sync-free path")
            return _original(self, index, *rest)

        mp.setattr(torch.Tensor, method, guarded)


class _Trace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self._made: set[int] = set()  # storages made inside the region
        self._outside: set[int] = set()  # storages from before it

    def describe(self, x):
        if not isinstance(x, torch.Tensor):
            return x if isinstance(x, (int, float, bool, str, type(None))) else repr(x)
        geometry = (tuple(x.shape), x.stride(), x.dtype)
        ptr = x.untyped_storage().data_ptr()
        if ptr == 0 or ptr in self._made:
            return ("made here",) + geometry
        self._outside.add(ptr)
        return ("persistent", x.data_ptr()) + geometry

    def record(self, name, leaves, outputs=()):
        self.ops.append((name,) + tuple(self.describe(x) for x in leaves))
        for out in outputs:
            if isinstance(out, torch.Tensor):
                ptr = out.untyped_storage().data_ptr()
                if ptr not in self._outside:
                    self._made.add(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        if (name.split(".")[0] in _FORBIDDEN_OPS or name in _SYNCING_OVERLOADS
                or (name == "repeat_interleave.Tensor" and kwargs.get("output_size") is None)):
            raise AssertionError(f"aten op {name} (a host sync or a data-dependent shape) on the sync-free path")
        leaves, _ = tree_flatten((args, kwargs))
        out = func(*args, **kwargs)
        outputs, _ = tree_flatten(out)
        self.record(func.__name__, leaves, outputs)
        return out


def allow_lagged_reads(mp: pytest.MonkeyPatch) -> None:
    """Let `LaggedRead` read its host snapshots under the guards (see the module docstring)."""
    from sparseserve_vllm.core.lagged_read import LaggedRead

    read = LaggedRead._read

    def paused_read(self, snapshot):
        _PAUSED[0] += 1
        try:
            return read(self, snapshot)
        finally:
            _PAUSED[0] -= 1

    mp.setattr(LaggedRead, "_read", paused_read)


@contextlib.contextmanager
def graph_trace(mp: pytest.MonkeyPatch):
    """Guard and record a region (see the module docstring); yields the list of recorded ops, filled on exit."""
    from triton.runtime import interpreter

    forbid_host_sync(mp)
    trace = _Trace()
    launch = interpreter.GridExecutor.__call__

    def traced_launch(executor, *args, **kwargs):
        grid = executor.grid if isinstance(executor.grid, tuple) else repr(executor.grid)
        trace.record(f"triton:{executor.fn.__name__}:{grid}", list(args) + [x for kv in sorted(kwargs.items()) for x in kv])
        _PAUSED[0] += 1
        try:
            with _disable_current_modes():
                return launch(executor, *args, **kwargs)
        finally:
            _PAUSED[0] -= 1

    mp.setattr(interpreter.GridExecutor, "__call__", traced_launch)
    ops: list[tuple] = []
    with trace:
        yield ops
    ops.extend(trace.ops)
