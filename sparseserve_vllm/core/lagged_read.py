"""`LaggedRead`: a few integers of the device read on the host a step or two later, without waiting for the GPU.

Contract:
- `LaggedRead(device, size, depth=2)`: snapshots of up to `size` int64 values into host buffers, pinned when `device`
  is a CUDA device (made only where `swap` runs: on the host, outside CUDA-graph capture; a buffer grows to twice
  its size or more when a snapshot needs it, and a read buffer is used again). At most `depth` snapshots are in
  flight (`depth >= 1`).
- `swap(values, tag=None)`: returns the snapshots that are complete, then starts a new one: `values` (a 1-D integer
  tensor on `device`) are copied into a host buffer, on CUDA by a non-blocking device->host copy on the current
  stream followed by a CUDA event recorded on it, on the CPU by a plain copy (complete at once). `tag` (any Python
  object, e.g. the step the values describe) is kept with them. The device tensor may be changed or freed right
  after `swap` returns: later work on that stream runs after the copy.
  What it returns: a list of `(tag, values as a list of ints)`, oldest first, of the pending snapshots whose copy
  has completed (`event.query()`: no waiting), stopping at the first that has not; and if `depth` snapshots would
  still be pending, it first waits for the oldest and returns it too. So on the CPU (and on CUDA when the GPU keeps
  up) every `swap` returns exactly the previous snapshot: values come back one `swap` later; on CUDA, when the GPU
  is behind the host, they come back later (at most `depth` swaps) instead of the host waiting.
- `take()`: every pending snapshot, oldest first, waiting for each copy (a synchronous reader: tests, shutdown);
  `[]` when none is pending.
- One code path on both devices (only the copy's blocking and the event differ), so CPU runs test the same logic.
No vLLM import.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

__all__ = ["LaggedRead"]


class LaggedRead:
    def __init__(self, device: torch.device | str, size: int, depth: int = 2):
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        self.device = torch.empty(0, device=device).device
        self.depth = depth
        self._size = size
        self._free: list[tuple[torch.Tensor, Any]] = []  # (host buffer, event) pairs ready for reuse
        self._pending: deque[tuple[Any, int, torch.Tensor, Any]] = deque()  # (tag, n, buffer, event), oldest first

    def _new_event(self):
        return torch.cuda.Event() if self.device.type == "cuda" else None

    def _record(self, event) -> None:
        if event is not None:
            event.record(torch.cuda.current_stream(self.device))

    def swap(self, values: torch.Tensor, tag: Any = None) -> list[tuple[Any, list[int]]]:
        """The complete snapshots, then a new one of `values` (see the module docstring)."""
        done = []
        while self._pending and (self._pending[0][3] is None or self._pending[0][3].query()):
            done.append(self._read(self._pending.popleft()))
        if len(self._pending) >= self.depth:
            done.append(self._read(self._pending.popleft()))
        n = values.numel()
        buffer, event = self._free.pop() if self._free else (None, self._new_event())
        if buffer is None or buffer.numel() < n:
            size = max(n, self._size if buffer is None else 2 * buffer.numel())
            buffer = torch.empty(size, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        buffer[:n].copy_(values.view(-1), non_blocking=True)
        self._record(event)
        self._pending.append((tag, n, buffer, event))
        return done

    def take(self) -> list[tuple[Any, list[int]]]:
        """Every pending snapshot, oldest first, waiting for their copies."""
        done = []
        while self._pending:
            done.append(self._read(self._pending.popleft()))
        return done

    def _read(self, snapshot: tuple[Any, int, torch.Tensor, Any]) -> tuple[Any, list[int]]:
        """The values of a snapshot taken off the queue (waiting for its copy); its buffer is used again."""
        tag, n, buffer, event = snapshot
        if event is not None:
            event.synchronize()
        values = buffer[:n].tolist()
        self._free.append((buffer, event))
        return tag, values
