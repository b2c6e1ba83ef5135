"""FlashD2H: save each step's new KV from where it is computed into the host store, off the forward pass.

Contract:
- `FlashD2HSaver(host, max_tokens, num_threads=4, *, staging_tokens=2*max_tokens, device=None, mode=None,
  num_sms=8, tile_bytes=16384, min_copy_bytes=MIN_COPY_BYTES)` saves into `host.kv` (a `HostKVStore`).
  `device`: where the new KV lives (default: the current CUDA device when the store is pinned, else the CPU).
  `mode`: "uva" (the default on a CUDA device, which it needs) or "staged" (the default and only mode on the CPU).
  `max_tokens`: the most tokens staged as one part (a larger save is cut into parts). `staging_tokens`
  (>= max_tokens): the staging ring's rows. `num_threads`: staged mode's scatter threads; `num_sms`: uva mode's
  scatter programs (the SMs it may take from compute; 8 move as many GB/s as 16 and slow a layer-segmented prefill
  less: benchmarks/results/README.md, 13b);
  `tile_bytes`: uva mode's bytes per scatter tile (`kernels.FlashD2HScatter`); `min_copy_bytes` (default 512 KiB):
  `save_blocks`' shortest run of blocks moved by one copy (shorter runs would be host-bound below the scatter
  kernel's rate).
- `save(layer, key, value, slot_mapping)`: `slot_mapping` is 1-D int32/int64 `[T]` of LOGICAL slot ids
  `block * block_size + offset` (`-1` = padding, skipped), on `device` or on the CPU. `key`, `value` are
  `[>= T, Hkv, D]` of the host store's dtype on `device` (rows past T are ignored, as vLLM's padded batches
  have); or `value=None` and `key` is the packed `[>= T, Hkv, 2D]` (K then V per head). Once the save is
  complete, for every token t with `slot_mapping[t] = s >= 0`:
  `host.kv[layer, s // block_size, h, s % block_size] == cat(key[t, h], value[t, h])` for every head h.
  Slot ids must be unique within one save (vLLM's are); between saves the later save of a slot wins.
  `save` is host-side work, not capturable in a CUDA graph: call it where the forward runs eagerly (vLLM's
  piecewise CUDA graphs leave the attention layer, which calls it, outside the graphs).
- `save_inline(layer, key, value, slot_mapping, saved=None)`: the same effect, for the few tokens of a decode step,
  without the ring, the side stream or any Python state that changes between calls, so a full CUDA graph can
  capture it:
  `flush()` (a no-op unless ring saves were committed since the last flush, so call `flush()` before capturing),
  then, on the caller's current stream, one op packs K and V (`torch.cat`, freshly allocated: in a graph, the
  graph's pool) and the FlashD2H scatter kernel writes the rows into `host.kv` (CUDA and the CPU under
  `TRITON_INTERPRET=1`: the kernel, out-of-range slots skipped and counted for `wait_all`; a plain CPU:
  `flash_d2h_scatter_torch`, which synchronizes). `slot_mapping` must be on `device`. `saved=c` (an int64
  one-element tensor on `device`): the tokens saved are added to `c` on the device, by the kernel itself. Ordered
  with ring saves both ways: it flushes first, and a later ring piece's side stream waits for the caller's stream.
- Mechanism. Each save (or part) takes the next n rows of a staging ring:
  1. On the caller's (compute) stream, ONE op packs its tokens into the ring `[n, Hkv, 2D]` (`torch.cat` of K
     and V, or a copy of packed KV), one copies the slot ids (uva: and one fills the rows' layer). This consumes
     the caller's tensors in stream order, so their memory (a CUDA-graph pool, the caching allocator) may be
     reused right after `save` returns.
  2. Consecutive saves are committed as one *piece* (a contiguous run of ring rows) once they reach 4 MiB, when
     a layer repeats (a new step began), when the ring wraps, or at `flush()`. A side CUDA stream (of the highest
     priority) waits for the packing ops, then
     uva: launches the FlashD2H scatter kernel (`kernels.flash_d2h_scatter`, at most `num_sms` programs): the
       GPU writes the piece's rows straight into `host.kv` through UVA; an event marks the piece done.
     staged: copies the piece's rows and slot ids into a pinned host copy of the ring (two contiguous D2H
       copies) and records an event; `num_threads` worker threads wait for it and scatter the rows into `host.kv` with
       numpy fancy-index assignment (tasks of >= 1 MiB; a piece's tasks wait for the previous pieces holding
       any of its layers, and a piece holds a layer at most once, so saves land in order).
     On the CPU (staged only) step 1 packs straight into the host ring and step 2 only submits the tasks.
  Ring rows are reused only after the piece that read them is done: uva makes the compute stream wait for its
  event (a GPU-side wait; the host never blocks); staged blocks `save` on the host until its tasks finished.
  Size the ring for two layers of a full step so that neither wait ever finds the piece still running.
- `save_blocks(layer, key, value, block_ids)`: the same effect for a save that fills whole blocks (a layer-segmented
  prompt): `block_ids` (on the CPU: a sequence of ints, a numpy array or a CPU tensor) are m distinct logical block
  ids, block i receiving tokens `[i * block_size, (i + 1) * block_size)` of `key`/`value` (`[>= m * block_size, Hkv,
  D]`, or packed). One layer's blocks with consecutive ids are one contiguous run of `host.kv`, and in the store's
  layout, so they need no scatter: the blocks are packed in block-id order in that layout (on the compute stream,
  into a fresh tensor the caching allocator keeps until the copies are done) and every run of at least
  `min_copy_bytes` goes to `host.kv` as ONE copy by the copy engine (uva: on the side stream, behind earlier saves;
  staged: after draining them, in the call). Blocks in shorter runs go through `save` (`core.block_runs`). The copy
  engine moves PCIe's full rate and takes no SMs from compute (the scatter kernel's writes reach ~0.9 of it).
- `flush()` commits, then makes every save so far visible to work the caller queues next on its current stream
  (a FlashH2D load of a page saved this step): uva only enqueues a wait of that stream for the side stream, and
  only when a piece was launched since the last flush (so the wait is made once per step, on the stream that the
  caller uses for all its work, vLLM's compute stream; inside a CUDA-graph capture it then enqueues nothing);
  staged blocks until the scatter tasks finished (and re-raises a task's error).
- `wait_all()` blocks until every save is in `host.kv` (call it before the host reads the store) and raises
  `ValueError` for slot ids beyond the store (uva: the kernel skipped and counted those tokens; staged: a task's
  error). `close()` waits for all and stops the threads; idempotent. Slot ids on the CPU are checked in `save`.
- Memory: uva: `staging_tokens * (Hkv*2D*itemsize + 12)` bytes of HBM. staged: `staging_tokens *
  (Hkv*2D*itemsize + 8)` bytes of pinned host memory (plain host memory on the CPU), on CUDA as much HBM.
- Not here: the write-through of new tokens into HBM cache slots (paper Fig. 7). The attention layer needs
  those tokens in HBM on the compute stream before its attention kernel of this very step, so it belongs to
  the caller's KV-cache update (vLLM's `do_kv_cache_update`), which knows the slots the HBM cache gave them.
"""

from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from sparseserve_vllm.core.block_runs import plan_block_runs
from sparseserve_vllm.core.host_kv import HostKVStore
from sparseserve_vllm.kernels.flash_d2h_scatter import _INTERPRET as _SCATTER_INTERPRET
from sparseserve_vllm.kernels.flash_d2h_scatter import FlashD2HScatter, flash_d2h_scatter_torch

__all__ = ["FlashD2HSaver", "MIN_COPY_BYTES", "MODES"]

MODES = ("uva", "staged")

_MIN_TASK_BYTES = 1 << 20
_CPU = torch.device("cpu")
_COMMIT_BYTES = 4 << 20
MIN_COPY_BYTES = 512 << 10
"""`min_copy_bytes`' default: one copy costs ~8 us of host time, which moves ~440 KB at PCIe's 55 GB/s."""
_HIGHEST_PRIORITY = -100  # torch maps a priority beyond the device's range to its highest


class _Piece:
    """One committed piece: ring rows [start, start + n), its event (CUDA) and its scatter tasks (staged)."""

    __slots__ = ("start", "n", "event", "futures")

    def __init__(self, start: int, n: int, event):
        self.start, self.n, self.event = start, n, event
        self.futures: list[Future] = []


class FlashD2HSaver:
    """Asynchronous saver of new KV into a `HostKVStore` (see the module docstring)."""

    def __init__(
        self,
        host: HostKVStore,
        max_tokens: int,
        num_threads: int = 4,
        *,
        staging_tokens: int | None = None,
        device: torch.device | str | None = None,
        mode: str | None = None,
        num_sms: int = 8,
        tile_bytes: int = 16384,
        min_copy_bytes: int | None = None,
    ):
        if not isinstance(host, HostKVStore):
            raise ValueError(f"host must be a HostKVStore, got {type(host).__name__}")
        if staging_tokens is None and isinstance(max_tokens, int):
            staging_tokens = 2 * max_tokens
        for name, value in (("max_tokens", max_tokens), ("num_threads", num_threads),
                            ("staging_tokens", staging_tokens), ("num_sms", num_sms)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        min_copy_bytes = MIN_COPY_BYTES if min_copy_bytes is None else min_copy_bytes
        if not isinstance(min_copy_bytes, int) or isinstance(min_copy_bytes, bool) or min_copy_bytes < 0:
            raise ValueError(f"min_copy_bytes must be an integer >= 0, got {min_copy_bytes!r}")
        if staging_tokens < max_tokens:
            raise ValueError(f"staging_tokens ({staging_tokens}) must be >= max_tokens ({max_tokens})")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if host.pin else torch.device("cpu")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be the CPU or a CUDA device, got {device}")
        if device.type == "cuda" and not host.pin:
            raise ValueError("device is a GPU but the host store is not pinned: build it with pin=True")
        if mode is None:
            mode = "uva" if device.type == "cuda" else "staged"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (or None: uva on a CUDA device, else staged), got {mode!r}")
        if mode == "uva" and device.type != "cuda":
            raise ValueError(f"mode 'uva' needs a CUDA device (the GPU writes the host store), got device {device}")
        self.host = host
        self.max_tokens = max_tokens
        self.staging_tokens = staging_tokens
        self.num_threads = num_threads
        self.device = device
        self.mode = mode
        self._capacity = host.num_logical_blocks * host.block_size
        h, d2 = host.num_kv_heads, 2 * host.head_dim
        self._row_bytes = h * d2 * host.kv.element_size()  # ring bytes per token
        self.min_copy_bytes = min_copy_bytes
        self._copied = None  # event after the last copy-engine runs of `save_blocks` (uva)
        if device.type == "cuda":
            self._dev_kv = torch.empty((staging_tokens, h, d2), dtype=host.dtype, device=device)
            self._dev_slots = torch.empty((staging_tokens,), dtype=torch.int64, device=device)
            # The highest priority: the scatter is PCIe-bound on at most `num_sms` programs, and at normal
            # priority its programs wait behind compute kernels that fill the SMs instead of running beside them.
            self._stream = torch.cuda.Stream(device, priority=_HIGHEST_PRIORITY)
        else:
            self._stream = None
        if mode == "uva":
            self._dev_layers = torch.empty((staging_tokens,), dtype=torch.int32, device=device)
            self._kernel = FlashD2HScatter(num_sms=num_sms, tile_bytes=tile_bytes).plan(host.kv, device)
            self._inline = self._kernel
            self._pool = None
        else:
            row = np.dtype((np.void, d2 * host.kv.element_size()))
            # numpy aliases: store [((layer * blocks + block) * Hkv + head) * block_size + offset] -> one
            # 2D-element row; host ring [token, head] -> one row
            self._host_rows = host.kv.view(torch.uint8).numpy().view(row).reshape(-1)
            self._heads = np.arange(h, dtype=np.int64)
            self._kv = torch.empty((staging_tokens, h, d2), dtype=host.dtype, pin_memory=host.pin)
            self._slots = torch.empty((staging_tokens,), dtype=torch.int64, pin_memory=host.pin)
            self._rows = self._kv.view(torch.uint8).numpy().view(row).reshape(staging_tokens, h)
            self._slots_np = self._slots.numpy()
            self._last: dict[int, list[Future]] = {}  # layer -> scatter tasks of the last piece holding it
            self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="flash_d2h")
            self._inline = (FlashD2HScatter(num_sms=num_sms, tile_bytes=tile_bytes).plan(host.kv, device)
                            if device.type == "cuda" or _SCATTER_INTERPRET else None)
        self._unflushed = False  # a piece was launched on the side stream since the last flush
        self._pending: list[tuple[int, int, int]] = []  # saves staged but not committed: (first row, rows, layer)
        self._pending_rows = 0
        self._free_events: list = []
        self._inflight: deque[_Piece] = deque()  # FIFO = ring order after the head
        self._head = 0
        self._closed = False

    # ------------------------------------------------------------------ API

    def save(self, layer: int, key: torch.Tensor, value: torch.Tensor | None, slot_mapping: torch.Tensor) -> None:
        """Start saving the new tokens of `layer`; returns once they are queued (see the module docstring)."""
        t = self._check_save(layer, key, value, slot_mapping)
        if slot_mapping.device.type == "cpu" and t and int(slot_mapping.max()) >= self._capacity:
            raise ValueError(f"slot_mapping must be < {self._capacity} (the store's slots), got {int(slot_mapping.max())}")
        if t <= self.max_tokens and key.shape[0] == t and (value is None or value.shape[0] == t):  # no slicing
            self._save_piece(layer, key, value, slot_mapping)
            return
        for a in range(0, t, self.max_tokens):
            b = min(t, a + self.max_tokens)
            self._save_piece(layer, key[a:b], None if value is None else value[a:b], slot_mapping[a:b])

    def save_blocks(self, layer: int, key: torch.Tensor, value: torch.Tensor | None, block_ids) -> None:
        """Save whole blocks: contiguous runs by the copy engine, the rest through `save` (see the module docstring)."""
        host, bs = self.host, self.host.block_size
        if isinstance(block_ids, torch.Tensor) and block_ids.device != _CPU:
            raise ValueError(f"block_ids must be on the CPU (the host plans the copies), got {block_ids.device}")
        ids = np.asarray(block_ids.numpy() if isinstance(block_ids, torch.Tensor) else block_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError("block_ids must be a 1-D sequence of ints on the CPU")
        if ids.size and not 0 <= int(ids.min()) <= int(ids.max()) < host.num_logical_blocks:
            raise ValueError(f"block_ids must be in [0, {host.num_logical_blocks}) (the store's blocks), "
                             f"got [{int(ids.min())}, {int(ids.max())}]")
        t = ids.size * bs
        self._check_kv(layer, key, value, t)
        plan = plan_block_runs(ids, bs * self._row_bytes, self.min_copy_bytes)
        if plan.rest.size:
            tokens = (plan.rest[:, None] * bs + np.arange(bs)).reshape(-1)
            slots = torch.from_numpy((ids[plan.rest].astype(np.int64)[:, None] * bs + np.arange(bs)).reshape(-1))
            rows = torch.from_numpy(tokens).to(self.device)
            self.save(layer, key.index_select(0, rows), None if value is None else value.index_select(0, rows), slots)
        if plan.runs:
            self._copy_runs(layer, _block_layout(key[:t], None if value is None else value[:t], bs, plan), plan.runs)

    def save_inline(self, layer: int, key: torch.Tensor, value: torch.Tensor | None,
                    slot_mapping: torch.Tensor, saved: torch.Tensor | None = None) -> None:
        """Save the new tokens of `layer` on the current stream, CUDA-graph capturable (see the module docstring).
        `saved` (an int64 one-element tensor on `device`): the tokens saved are added to it (by the kernel)."""
        t = self._check_save(layer, key, value, slot_mapping)
        if slot_mapping.device != self.device:
            raise ValueError(f"slot_mapping must be on {self.device} for save_inline, got {slot_mapping.device}")
        self.flush()  # earlier ring saves land first; a no-op when nothing was committed since the last flush
        packed = key[:t].contiguous() if value is None else torch.cat((key[:t], value[:t]), dim=-1)
        if self._inline is None:  # the CPU without the Triton interpreter: index assignment (synchronous anyway)
            flash_d2h_scatter_torch(self.host.kv, packed, slot_mapping, layer)
            if saved is not None:
                saved += (slot_mapping >= 0).sum()
        else:
            self._inline.run(packed, slot_mapping.contiguous(), layer, saved=saved)

    def flush(self) -> None:
        """Make every save so far visible to work queued next on the current stream (uva: without blocking; a
        no-op when nothing was committed since the last flush)."""
        if self.mode == "staged":
            self._drain()
            return
        self._commit()
        if self._unflushed:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            self._unflushed = False

    def wait_all(self) -> None:
        """Block until every save is in the host store; raise `ValueError` for slot ids beyond the store."""
        self._drain()
        skipped = 0
        if self._inline is not None and self._stream is not None:
            # Side-stream pieces are done; inline saves ran on the caller's stream: read the count after both,
            # on the side stream (the compute stream itself is not synchronized).
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                skipped = self._inline.take_out_of_range()
        elif self._inline is not None:
            skipped = self._inline.take_out_of_range()
        if skipped:
            raise ValueError(f"slot_mapping must be < {self._capacity} (the store's slots): {skipped} token(s) "
                             "saved since the last wait_all() had a larger slot id and were not saved")

    def close(self) -> None:
        """Wait for every save, then stop the worker threads. Idempotent."""
        if self._closed:
            return
        try:
            self.wait_all()
        finally:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def __enter__(self) -> "FlashD2HSaver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- internals

    def _check_save(self, layer: int, key: torch.Tensor, value: torch.Tensor | None, slot_mapping: torch.Tensor) -> int:
        """Validate one save's arguments (no tensor values are read); returns T."""
        if (not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1
                or slot_mapping.dtype not in (torch.int32, torch.int64)):
            raise ValueError("slot_mapping must be a 1-D int32 or int64 tensor")
        if slot_mapping.device not in (self.device, _CPU):
            raise ValueError(f"slot_mapping must be on {self.device} or the CPU, got {slot_mapping.device}")
        t = slot_mapping.numel()
        self._check_kv(layer, key, value, t)
        return t

    def _check_kv(self, layer: int, key: torch.Tensor, value: torch.Tensor | None, t: int) -> None:
        """Validate the layer and the K/V of a save of t tokens."""
        if self._closed:
            raise ValueError("save() after close()")
        host = self.host
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < host.num_layers:
            raise ValueError(f"layer must be an integer in [0, {host.num_layers}), got {layer!r}")
        width = 2 * host.head_dim if value is None else host.head_dim
        for name, x in (("key", key), ("value", value)):
            if x is None:
                continue
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1:] != (host.num_kv_heads, width) or x.shape[0] < t:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must be [>= {t}, {host.num_kv_heads}, {width}] (T = len(slot_mapping)), got {got}")
            if x.dtype != host.dtype:
                raise ValueError(f"{name} dtype must be the host store's {host.dtype}, got {x.dtype}")
            if x.device != self.device:
                raise ValueError(f"{name} must be on {self.device}, got {x.device}")

    def _copy_runs(self, layer: int, blocks: torch.Tensor, runs: list[tuple[int, int]]) -> None:
        """`blocks` ([k, Hkv, block_size, 2D], the runs' blocks in order) -> `host.kv[layer]`, one copy per run."""
        dst, uva = self.host.kv[layer], self.mode == "uva"
        if uva:
            self._commit()  # earlier ring saves go first on the side stream
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        else:
            self._drain()  # earlier saves of these slots land first
        with torch.cuda.stream(self._stream) if uva else contextlib.nullcontext():
            i = 0
            for first, n in runs:
                dst[first:first + n].copy_(blocks[i:i + n], non_blocking=uva)
                i += n
            if uva:
                blocks.record_stream(self._stream)  # the caching allocator keeps it until the copies are done
                if self._copied is None:
                    self._copied = torch.cuda.Event(blocking=True)
                self._copied.record(self._stream)
                self._unflushed = True

    def _drain(self) -> None:
        """Commit, then block until every committed piece and `save_blocks` copy is done (its scatter tasks
        finished, staged)."""
        self._commit()
        while self._inflight:
            self._retire(self._inflight.popleft(), block=True)
        if self._copied is not None:
            self._copied.synchronize()

    def _retire(self, piece: _Piece, block: bool) -> None:
        """Free the piece's ring rows: after its scatter, for the host (`block`) or for the current stream (uva)."""
        try:
            if self.mode == "staged":
                for f in piece.futures:
                    f.result()
            elif block:
                piece.event.synchronize()  # sleeps (blocking-sync event)
            else:
                torch.cuda.current_stream(self.device).wait_event(piece.event)
        finally:
            if piece.event is not None:
                self._free_events.append(piece.event)

    def _reserve(self, n: int) -> int:
        """Start of n free ring rows, after retiring the oldest pieces that still occupy them."""
        # Committed pieces, oldest first: those of the previous lap (all at rows >= head, in row order), then those
        # of this lap (rows < head); the pending saves end at the head. So the pieces in the way of new rows are
        # always a prefix of the FIFO.
        if self._head + n > self.staging_tokens:  # wrap: the rows past the head stay unused this lap
            self._commit()  # a piece is one contiguous run of rows
            while self._inflight and self._inflight[0].start >= self._head:
                self._retire(self._inflight.popleft(), block=False)
            self._head = 0
        start, end = self._head, self._head + n
        while self._inflight and self._inflight[0].start < end and start < self._inflight[0].start + self._inflight[0].n:
            self._retire(self._inflight.popleft(), block=False)
        self._head = end
        return start

    def _save_piece(self, layer: int, key: torch.Tensor, value: torch.Tensor | None, slots: torch.Tensor) -> None:
        if any(seg_layer == layer for _, _, seg_layer in self._pending):
            self._commit()  # one layer at most once per piece, so a piece never writes one slot twice
        n = slots.numel()
        s = self._reserve(n)
        rows = slice(s, s + n)
        if self._stream is None:  # step 1 on the CPU: straight into the host ring
            _pack(key, value, self._kv[rows])
            self._slots[rows].copy_(slots)
        else:  # step 1, on the compute stream
            _pack(key, value, self._dev_kv[rows])
            self._dev_slots[rows].copy_(slots)
            if self.mode == "uva":
                self._dev_layers[rows].fill_(layer)
        self._pending.append((s, n, layer))
        self._pending_rows += n
        if self._pending_rows * self._row_bytes >= _COMMIT_BYTES:
            self._commit()

    def _commit(self) -> None:
        """Turn the pending saves (ring rows [start, head)) into one piece (step 2)."""
        if not self._pending:
            return
        start, n = self._pending[0][0], self._pending_rows
        rows = slice(start, start + n)
        event = None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            event = self._free_events.pop() if self._free_events else torch.cuda.Event(blocking=True)
            self._unflushed = True
            with torch.cuda.stream(self._stream):
                if self.mode == "uva":
                    self._kernel.run(self._dev_kv[rows], self._dev_slots[rows], self._dev_layers[rows])
                else:
                    self._kv[rows].copy_(self._dev_kv[rows], non_blocking=True)
                    self._slots[rows].copy_(self._dev_slots[rows], non_blocking=True)
                event.record(self._stream)
        piece = _Piece(start, n, event)
        if self.mode == "staged":
            self._submit_tasks(piece)
        self._inflight.append(piece)
        self._pending = []
        self._pending_rows = 0

    def _submit_tasks(self, piece: _Piece) -> None:
        """Staged step 2 on the host: the piece's scatter tasks, after the previous pieces holding its layers."""
        layers = np.repeat(np.array([seg[2] for seg in self._pending], dtype=np.int64), [seg[1] for seg in self._pending])
        touched = {seg[2] for seg in self._pending}
        deps = list({id(f): f for layer in touched for f in self._last.get(layer, ())}.values())
        parts = max(1, min(self.num_threads, piece.n * self._row_bytes // _MIN_TASK_BYTES))
        bounds = np.linspace(0, piece.n, parts + 1).astype(np.int64)
        piece.futures = [
            self._pool.submit(self._scatter, piece.event, layers, piece.start, int(bounds[i]), int(bounds[i + 1]), deps)
            for i in range(parts)
            if bounds[i + 1] > bounds[i]
        ]
        for layer in touched:
            self._last[layer] = piece.futures

    def _scatter(self, copied, layers: np.ndarray, start: int, a: int, b: int, deps: list[Future]) -> None:
        """Staged worker: host ring rows [start + a, start + b) -> host.kv; `layers[i]`: ring row start + i's layer."""
        if copied is not None:  # the piece's D2H copy (CUDA)
            copied.synchronize()  # sleeps (blocking-sync event) with the GIL released
        for f in deps:
            f.result()
        slots = self._slots_np[start + a:start + b]
        src = self._rows[start + a:start + b]
        layers = layers[a:b]
        valid = slots >= 0
        if not valid.all():
            keep = np.flatnonzero(valid)
            slots, src, layers = slots[keep], src[keep], layers[keep]
        if slots.size == 0:
            return
        top = int(slots.max())
        if top >= self._capacity:
            raise ValueError(f"slot_mapping must be < {self._capacity} (the store's slots), got {top}")
        bs, nb = self.host.block_size, self.host.num_logical_blocks
        block = slots // bs
        rows = ((layers * nb + block)[:, None] * self.host.num_kv_heads + self._heads) * bs + (slots - block * bs)[:, None]
        self._host_rows[rows.reshape(-1)] = src.reshape(-1)


def _block_layout(key: torch.Tensor, value: torch.Tensor | None, block_size: int, plan) -> torch.Tensor:
    """The blocks `plan.order` of a whole-block save in the host store's layout, `[k, Hkv, block_size, 2D]`, packed
    by one strided copy per K and V (and, unless the order is the save's own, one gather each before it)."""
    m, h = key.shape[0] // block_size, key.shape[1]
    width = key.shape[2] if value is None else 2 * key.shape[2]
    out = torch.empty((plan.order.size, h, block_size, width), dtype=key.dtype, device=key.device)
    order = None if plan.identity else torch.from_numpy(plan.order).to(key.device)
    parts = ((key, out),) if value is None else ((key, out[..., :key.shape[2]]), (value, out[..., key.shape[2]:]))
    for x, o in parts:
        x = x.reshape(m, block_size, h, x.shape[2])
        o.copy_((x if order is None else x.index_select(0, order)).transpose(1, 2))
    return out


def _pack(key: torch.Tensor, value: torch.Tensor | None, out: torch.Tensor) -> None:
    """ONE op: `out[:] = cat(key, value, -1)` (or `out[:] = key` for packed KV)."""
    if value is None:
        out.copy_(key)
    else:
        torch.cat((key, value), dim=-1, out=out)
