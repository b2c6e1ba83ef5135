"""`LaggedRead`: a few integers of the device read on the host one step later, without waiting for the GPU.

Contract:
- `LaggedRead(device, size)`: a host buffer of `size` int64 values, pinned when `device` is a CUDA device (made
  here, once; a `swap` of more values replaces it by one twice as large or more, so callers allocate only rarely,
  and only where they run: on the host, outside CUDA-graph capture).
- `swap(values, tag=None)`: returns what `take()` returns, then starts a new snapshot: `values` (a 1-D integer
  tensor on `device`) are copied into the host buffer, on CUDA by a non-blocking device->host copy on the current
  stream followed by a CUDA event recorded on it, on the CPU by a plain copy (already complete: no event). `tag`
  (any Python object, e.g. the step the values describe) is kept with them. The device tensor may be changed or
  freed right after `swap` returns: later work on that stream runs after the copy.
- `take()`: `(tag, values as a list of ints)` of the last snapshot, or None when none is pending (never made, or
  taken already); on CUDA it first waits for the snapshot's event. A `swap` of the next step, on the host before
  that step's work is queued, finds the event complete in steady state: it waits for the GPU to pass the point
  where the snapshot was queued, never for work queued after it. Called right after a `swap` (a synchronous
  reader: tests, shutdown), it waits for all the work queued before it.
- One code path on both devices (only the copy's blocking and the event differ), so CPU runs test the same logic,
  with the same one-step lag.
No vLLM import.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LaggedRead"]


class LaggedRead:
    def __init__(self, device: torch.device | str, size: int):
        self.device = torch.empty(0, device=device).device
        self._event = torch.cuda.Event() if self.device.type == "cuda" else None
        self._host = self._buffer(size)
        self._pending: tuple[Any, int] | None = None  # (tag, number of values) of the snapshot not taken yet

    def _buffer(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int64, pin_memory=self._event is not None)

    def swap(self, values: torch.Tensor, tag: Any = None) -> tuple[Any, list[int]] | None:
        """The pending snapshot (see `take`), then a new one of `values` (see the module docstring)."""
        previous = self.take()
        n = values.numel()
        if n > self._host.numel():
            self._host = self._buffer(max(n, 2 * self._host.numel()))
        self._host[:n].copy_(values.view(-1), non_blocking=True)
        if self._event is not None:
            self._event.record(torch.cuda.current_stream(self.device))
        self._pending = (tag, n)
        return previous

    def take(self) -> tuple[Any, list[int]] | None:
        """`(tag, values)` of the pending snapshot (waiting for its copy), or None when none is pending."""
        if self._pending is None:
            return None
        (tag, n), self._pending = self._pending, None
        if self._event is not None:
            self._event.synchronize()
        return tag, self._host[:n].tolist()
