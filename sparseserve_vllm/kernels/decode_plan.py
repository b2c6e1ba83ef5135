"""FlashInfer-style plan()/run() wrapper for one layer's sparse decode step: score -> select -> slots -> attend.

``SparseDecodeWrapper(num_qo_heads, num_kv_heads, head_dim, page_size, ppb, selector="cuboid_mean",
token_budget=2048, sink_pages=2, recent_pages=2, device="cuda", dtype=torch.bfloat16, backend="auto",
gqa_reduce="sum")``
  * ``num_select = token_budget // page_size`` pages are attended per (request, KV head); ``ValueError`` if
    ``sink_pages + recent_pages + 1 > num_select``.
  * ``backend``: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton for a CUDA ``device``, torch otherwise).
  * ``gqa_reduce``: ``"sum"``, ``"max"``, ``"mass"`` or ``"zmax"``, how a KV head's query heads combine page scores
    (``score_pages``; ``"mass"`` uses ``run``'s ``scale``; ``"mass"`` and ``"zmax"`` a per-head score buffer from
    ``plan``).

``plan(batch_size, max_pages, num_splits=None)`` (host side, once per batch shape) allocates every intermediate
buffer (num_full_pages, scores ``[B, Hkv, max_pages]`` f32, page indices / slots / page lengths
``[B, Hkv, num_select]`` int32, the split-K workspace and an output buffer). The split-K factor is ``num_splits``
when given; otherwise each ``run`` picks ``choose_num_splits(b, ...)`` for its batch size ``b`` from the device's
SM count (fewer requests, more splits), and the workspace is sized for the largest of those.

``run(q, kv_pages, meta, block_table, seq_lens, scale, out=None)`` for ``q [b <= batch_size, Hq, D]``,
``kv_pages [N, page_size, 2D]`` (flat page view), ``meta [N, M, D]``, ``block_table [>= b, max_blocks]`` with
``max_blocks * ppb >= max_pages``, ``seq_lens [>= b]`` (each ``<= max_pages * page_size``): computes
``out [b, Hq, D]`` = attention of each query head over the valid tokens of the pages selected for its KV head
(all pages when ``seq_len <= token_budget`` rounded to pages, so it then equals dense decode attention).
On the Triton backend it runs one torch ``floor_divide`` into a plan buffer (``seq_lens // page_size``) and the
score, select (with fused slots/page lengths/counters) and attention kernels (plus the split-K merge when
``num_splits > 1``); it performs no allocation and no host synchronisation (CUDA-graph capturable).

``translate(slots, lens) -> slots`` (optional) maps the selected flat page slots (``[b, Hkv, num_select]``, with
their valid lengths) to rows of ``kv_pages`` before attention: the offload tier passes its HBM page cache as
``kv_pages`` and resolves logical pages to cache slots there (loading misses). The run stays CUDA-graph
capturable when ``translate`` is (the tier's is: fixed shapes, no host sync).

After ``run``: ``last_page_indices`` (``[b, Hkv, num_select]`` int32 logical pages, ascending, ``-1`` padded),
``last_slots`` and ``last_page_lens`` are views of the plan's buffers (overwritten by the next run);
``counters`` (int64 ``[3]``; also ``pages_scored``, ``pages_selected``, ``tokens_attended``) accumulate over
runs on the device until ``reset_counters()``.
"""

from __future__ import annotations

import torch

from .page_scores import PER_HEAD_REDUCES, check_gqa_reduce, score_pages
from .page_topk import select_pages
from .pages import num_meta_vectors, resolve_backend
from .sparse_decode import alloc_split_workspace, choose_num_splits, sparse_decode_attention


class SparseDecodeWrapper:
    """plan()/run() sparse decode attention for one layer (see module docstring)."""

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, ppb: int,
                 selector: str = "cuboid_mean", token_budget: int = 2048, sink_pages: int = 2,
                 recent_pages: int = 2, device="cuda", dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
                 gqa_reduce: str = "sum"):
        for name, v in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("page_size", page_size), ("ppb", ppb), ("token_budget", token_budget)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_qo_heads={num_qo_heads}")
        num_meta_vectors(selector)
        check_gqa_reduce(gqa_reduce)
        if token_budget < page_size:
            raise ValueError(f"token_budget must be >= page_size={page_size}, got {token_budget}")
        self.num_select = token_budget // page_size
        for name, v in (("sink_pages", sink_pages), ("recent_pages", recent_pages)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if sink_pages + recent_pages + 1 > self.num_select:
            raise ValueError(f"sink_pages + recent_pages + 1 must be <= token_budget // page_size = "
                             f"{self.num_select}, got {sink_pages} + {recent_pages} + 1")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.page_size, self.ppb, self.selector, self.gqa_reduce = page_size, ppb, selector, gqa_reduce
        self.token_budget, self.sink_pages, self.recent_pages = token_budget, sink_pages, recent_pages
        self.device, self.dtype = torch.device(device), dtype
        self.backend = resolve_backend(backend, torch.empty(0, device=self.device))
        self.counters = torch.zeros(3, dtype=torch.int64, device=self.device)
        self.batch_size = 0
        self.max_pages = 0
        self.num_splits = 1
        self._last_b = 0

    def plan(self, batch_size: int, max_pages: int, num_splits: int | None = None) -> None:
        """Allocate all buffers for batches of up to ``batch_size`` requests of up to ``max_pages`` pages."""
        for name, v in (("batch_size", batch_size), ("max_pages", max_pages)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self._sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                     if self.backend == "triton" and self.device.type == "cuda" else 1)
        self._auto_splits = num_splits is None
        if num_splits is None:
            num_splits = choose_num_splits(1, self.num_kv_heads, self.num_select, self._sms)
        if not isinstance(num_splits, int) or num_splits <= 0:
            raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
        dev, hkv, k = self.device, self.num_kv_heads, self.num_select
        self.batch_size, self.max_pages = batch_size, max_pages
        self.num_splits = min(num_splits, k)  # the most splits any run uses (the workspace's size)
        self._nfull = torch.zeros(batch_size, dtype=torch.int32, device=dev)
        self._scores = torch.empty((batch_size, hkv, max_pages), dtype=torch.float32, device=dev)
        self._head_scores = (torch.empty((batch_size, self.num_qo_heads, max_pages), dtype=torch.float32, device=dev)
                             if self.gqa_reduce in PER_HEAD_REDUCES else None)
        self._page_idx = torch.full((batch_size, hkv, k), -1, dtype=torch.int32, device=dev)
        self._slots = torch.zeros((batch_size, hkv, k), dtype=torch.int32, device=dev)
        self._lens = torch.zeros((batch_size, hkv, k), dtype=torch.int32, device=dev)
        self._out = torch.empty((batch_size, self.num_qo_heads, self.head_dim), dtype=self.dtype, device=dev)
        self._workspace = (alloc_split_workspace(batch_size, self.num_qo_heads, self.head_dim, self.num_splits, dev)
                           if self.num_splits > 1 and self.backend == "triton" else None)
        self._last_b = 0

    def run(self, q, kv_pages, meta, block_table, seq_lens, scale: float, out=None, translate=None):
        """One sparse decode step for ``q [b, Hq, D]``; returns ``out [b, Hq, D]`` (see module docstring)."""
        if self.batch_size == 0:
            raise ValueError("plan() must be called before run()")
        if q.dim() != 3 or q.shape[1:] != (self.num_qo_heads, self.head_dim) or q.dtype != self.dtype:
            raise ValueError(f"q must be {self.dtype} [b, {self.num_qo_heads}, {self.head_dim}], got {q.dtype} "
                             f"{tuple(q.shape)}")
        b = q.shape[0]
        if b > self.batch_size:
            raise ValueError(f"q.shape[0]={b} exceeds the planned batch_size={self.batch_size}")
        if kv_pages.dim() != 3 or kv_pages.shape[1] != self.page_size:
            raise ValueError(f"kv_pages must be [N, page_size={self.page_size}, 2*D], got {tuple(kv_pages.shape)}")
        if block_table.dim() != 2 or block_table.shape[1] * self.ppb < self.max_pages:
            raise ValueError(f"block_table must be [>= b, max_blocks] with max_blocks * ppb >= planned max_pages="
                             f"{self.max_pages}, got {tuple(block_table.shape)}")
        if seq_lens.dim() != 1 or seq_lens.shape[0] < b or seq_lens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seq_lens must be an int32/int64 tensor [>= {b}], got {seq_lens.dtype} "
                             f"{tuple(seq_lens.shape)}")
        if out is None:
            out = self._out[:b]
        nfull, scores = self._nfull[:b], self._scores[:b]
        page_idx, slots, lens = self._page_idx[:b], self._slots[:b], self._lens[:b]
        torch.floor_divide(seq_lens[:b], self.page_size, out=nfull)
        score_pages(q, meta, block_table, nfull, selector=self.selector, page_size=self.page_size, ppb=self.ppb,
                    num_kv_heads=self.num_kv_heads, gqa_reduce=self.gqa_reduce,
                    scale=scale if self.gqa_reduce == "mass" else None, head_scores=self._head_scores, out=scores,
                    backend=self.backend)
        select_pages(scores, seq_lens, page_size=self.page_size, num_select=self.num_select,
                     sink_pages=self.sink_pages, recent_pages=self.recent_pages, out=page_idx,
                     block_table=block_table, ppb=self.ppb, slots_out=slots, lens_out=lens,
                     counters=self.counters, backend=self.backend)
        if translate is not None:  # e.g. logical page slots -> HBM page-cache slots (offload)
            slots = translate(slots, lens)
        splits = self.splits_for(b)
        workspace = None
        if self._workspace is not None and splits > 1:
            rows = b * self.num_qo_heads * splits
            workspace = (self._workspace[0].view(-1, self.head_dim)[:rows].view(-1, splits, self.head_dim),
                         self._workspace[1].view(-1)[:rows].view(-1, splits))
        sparse_decode_attention(q, kv_pages, slots, lens, scale=scale, out=out, num_splits=splits,
                                workspace=workspace, backend=self.backend)
        self._last_b = b
        return out

    def splits_for(self, b: int) -> int:
        """The split-K factor a run of ``b`` requests uses."""
        if not self._auto_splits:
            return self.num_splits
        return min(self.num_splits, choose_num_splits(b, self.num_kv_heads, self.num_select, self._sms))

    @property
    def last_page_indices(self) -> torch.Tensor:
        """Logical pages selected by the last run, ``[b, Hkv, num_select]`` int32, ascending, ``-1`` padded."""
        return self._page_idx[:self._last_b]

    @property
    def last_slots(self) -> torch.Tensor:
        """Flat page slot ids of the last selection (0 for padding)."""
        return self._slots[:self._last_b]

    @property
    def last_page_lens(self) -> torch.Tensor:
        """Valid tokens per selected page of the last selection (0 for padding)."""
        return self._lens[:self._last_b]

    @property
    def pages_scored(self) -> torch.Tensor:
        return self.counters[0]

    @property
    def pages_selected(self) -> torch.Tensor:
        return self.counters[1]

    @property
    def tokens_attended(self) -> torch.Tensor:
        return self.counters[2]

    def reset_counters(self) -> None:
        self.counters.zero_()
