"""`SparseRuntime`: the per-process state shared by the SparseServe builder and every layer's impl.

Contract:
- One runtime per worker process and engine (`get_runtime`: a later engine in the same process, as with
  `VLLM_ENABLE_V1_MULTIPROCESSING=0`, gets a fresh one and the previous one's statistics thread stops); it owns the
  parsed `SparseServeConfig`, the KV geometry, one `SparseDecodeWrapper` whose buffers every layer reuses (layers
  run one after another), the page metadata tensor of each layer, the `OffloadTier` when `offload` is on, and the
  statistics counters.
- The builder makes the wrapper once (`make_wrapper`, planned for the largest batch and context, so its buffers
  never move and CUDA graphs captured over them stay valid) and calls `decode_counts` / `filled_page_slots` /
  `count` once per step (host side: with full CUDA graphs the impls' Python does not run at replay); impls use
  `wrapper` / `page_meta` from `forward`.
- Offload: the builder calls `begin_step` once per step, before the forward (so also before a CUDA-graph replay,
  which runs no impl Python): the tier's `begin_step` (earlier saves visible, counters snapshotted, deferred
  page-cache errors raised one step late, new eviction ring; no host sync) and `note_decode_rows`. Everything the
  impls do per layer in a decode-only step is free of host syncs and of Python state that changes between steps
  (see `OffloadTier`).
- Offload also keeps a `WorkingSetTracker` (window `working_set_window`): impls `record_selection` the logical
  pages each sparse decode layer selected (device-side only), the builder `note_decode_rows` (block table rows and
  lengths of the step's decode requests, and whether sparse layers select pages this step: then the report closes
  a decode step), and once per step, after the forward, the connector calls `working_set_report(step)` (`step`:
  the connector's number of the step). It computes on the device the working set of each decode request of the
  step, bytes = distinct (layer, page) of its own pages selected in the last `working_set_window` decode steps x
  page bytes (`page_size x 2 x head_dim x element size`), and snapshots them with the requests' first block ids
  into pinned host memory without a host sync (`LaggedRead`, tagged with `step`); it returns the newest earlier
  snapshot whose copy is done (normally the previous call's; on CUDA an older one when the GPU is behind, or none):
  `(its step, {first block id: bytes})`, requests with nothing selected in the window left out, or None (no
  snapshot done, or all left out). So the report describes an earlier decode step and is keyed by the block ids of
  that step: the scheduler maps them to requests with that step's number, and a block
  freed and given to another request since then is never credited to the new owner. Freed blocks' pages are
  forgotten (`free_blocks`).
- `page_meta(layer, kv_cache)`: the layer's page metadata `[num_pages (+ 1 with offload), M, D]`; with offload the
  extra LAST row is a trash row: page summaries of decode-only steps come in a -1 padded buffer, and
  `meta[slots] = ...` writes the padding there.
- Layer-segmented prefill (`adapter/segmented_prefill.py`) reads `model` (set when the model loads,
  `patches/model_loader.py`) and `step_decodes` (the builder's count of the step's decode requests).
- Every `stats_interval_s` seconds it publishes the counters (see `sparseserve_vllm.stats`) and logs one line
  summing every process of the engine (the scheduler's working-set cap included). The publishing thread reads
  host copies only (the tier's `last_stats`, a step late from `begin_step`'s snapshots, and current after
  `free_blocks`, which synchronizes anyway): a GPU sync from another thread during vLLM's CUDA-graph capture would
  invalidate the capture.
"""

from __future__ import annotations

import threading
import time

import torch

from sparseserve_vllm import stats
from sparseserve_vllm.adapter.config_access import segmented_prefill_on, sparseserve_config
from sparseserve_vllm.adapter.logging import logger as plugin_logger
from sparseserve_vllm.config import SparseServeConfig
from sparseserve_vllm.core.lagged_read import LaggedRead
from sparseserve_vllm.kernels.pages import num_meta_vectors

logger = plugin_logger(__name__)

_RUNTIME: "SparseRuntime | None" = None


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without blocking the host: staged through pinned memory on CUDA (a non-blocking copy
    from pageable memory is synchronous there); a plain copy elsewhere."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def get_runtime(vllm_config) -> "SparseRuntime":
    global _RUNTIME
    if _RUNTIME is None or not _RUNTIME.serves(vllm_config):
        if _RUNTIME is not None:
            _RUNTIME.stop()
        _RUNTIME = SparseRuntime(sparseserve_config(vllm_config), vllm_config)
    return _RUNTIME


class SparseRuntime:
    def __init__(self, cfg: SparseServeConfig, vllm_config) -> None:
        self.cfg = cfg
        self._engine = (vllm_config.instance_id, vllm_config.cache_config)
        self.max_num_batched_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs  # sizes the working-set report's host buffer
        # Layer-segmented prefill: its work per step (token x layer units) and so the most tokens of one layer it
        # saves at once (at most a whole prompt); FlashD2H stages such a save as one piece (one scatter launch, not
        # one per `max_num_batched_tokens`) and its ring holds two of them, so a layer's save never waits for the
        # previous one.
        self.segment_per_step = self.segment_unit_tokens = 0
        if segmented_prefill_on(vllm_config):
            layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
            self.segment_per_step = cfg.max_inject_tokens or self.max_num_batched_tokens * layers
            self.segment_unit_tokens = min(self.segment_per_step, vllm_config.model_config.max_model_len)
        self.save_unit_tokens = max(self.max_num_batched_tokens, self.segment_unit_tokens)  # FlashD2H's piece
        self.num_logical_blocks: int | None = None  # offload: the scheduler's block count (host tier)
        self.tier = None
        self.block_size: int | None = None
        self.ppb = 0
        self.wrapper = None
        self._meta: dict[int, torch.Tensor] = {}
        self.ws_tracker = None  # offload: WorkingSetTracker, made with the tier
        self.model = None  # layer-segmented prefill: the loaded model (patches/model_loader.py)
        self.step_decodes = 0  # decode requests of the step being run (builder), read by layer-segmented prefill
        # layer-segmented prefill: {request length: last-token attention outputs [layers, heads, head dim]} of the
        # requests whose last prompt token this step runs (set before the forward, cleared after it)
        self.segment_last: dict = {}
        self._ws_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (first block ids [R], owned pages [R, P])
        self._ws_open = False  # a step with selections was noted since the last end_step
        self._ws_report = None  # offload: LaggedRead of (first block ids, bytes), made with the tier
        self.counters = stats.process_counters()
        self._stats_dir = stats.ensure_stats_dir()
        self._stopped = threading.Event()
        threading.Thread(target=self._publish_loop, name="sparseserve-stats", daemon=True).start()

    def serves(self, vllm_config) -> bool:
        """Is `vllm_config` the engine's this runtime was made for? Copies of it keep its `instance_id` (pickled to
        worker processes, deep copies); `with_hf_config` views of it (a multimodal model's language model) get a new
        `instance_id` but share its sub-configs."""
        instance_id, cache_config = self._engine
        return vllm_config.instance_id == instance_id or vllm_config.cache_config is cache_config

    def stop(self) -> None:
        """End the statistics thread (a later engine in this process made its own runtime)."""
        self._stopped.set()

    # ---- geometry and planning (builder, host side) ----
    def bind_geometry(self, *, block_size: int, num_kv_heads: int, head_size: int, num_layers: int) -> None:
        self.cfg.validate_against(block_size=block_size)
        self.num_layers = num_layers
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.ppb = block_size // self.cfg.page_size

    def decode_counts(self, seq_lens_cpu: torch.Tensor) -> tuple[int, int, int]:
        """(pages scored, pages selected, tokens attended) of one sparse layer-step, summed over KV heads."""
        if seq_lens_cpu.numel() == 0:
            return 0, 0, 0
        ps, k = self.cfg.page_size, self.cfg.num_select_pages
        lens = seq_lens_cpu.to(torch.long)
        full = lens // ps
        pages = (lens + ps - 1) // ps
        partial = lens - full * ps
        over = pages > k
        selected = torch.where(over, torch.full_like(pages, k), pages)
        attended = torch.where(over, (k - (partial > 0).long()) * ps + partial, lens)
        h = self.num_kv_heads
        return int(full.sum()) * h, int(selected.sum()) * h, int(attended.sum()) * h

    def filled_page_slots(self, qsl_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """Flat page slots (every KV head) of the pages that this step's new tokens complete.

        Request r writes positions [seq_len - qlen, seq_len); page p completes when its last token
        p*page_size + page_size - 1 is among them, i.e. p in [start // page_size, seq_len // page_size).
        Host arithmetic plus one small index copy; no device sync.
        """
        ps = self.cfg.page_size
        lens = seq_lens_cpu.to(torch.long)
        qlens = (qsl_cpu[1:] - qsl_cpu[:-1]).to(torch.long)
        first = (lens - qlens) // ps
        count = (lens // ps - first).clamp_min(0)
        total = int(count.sum())
        if total == 0:
            return torch.empty(0, dtype=torch.long, device=block_table.device)
        req = torch.repeat_interleave(torch.arange(lens.numel()), count)
        offs = torch.arange(total) - torch.repeat_interleave(count.cumsum(0) - count, count)
        page = torch.repeat_interleave(first, count) + offs
        req_d, page_d = upload(req, block_table.device), upload(page, block_table.device)
        blocks = block_table[req_d, page_d // self.ppb].to(torch.long)
        heads = torch.arange(self.num_kv_heads, device=block_table.device)
        flat = (blocks[:, None] * self.num_kv_heads + heads[None, :]) * self.ppb + (page_d % self.ppb)[:, None]
        return flat.reshape(-1)

    def _publish_loop(self) -> None:
        """Publish changed counters twice a second; log the summary line every `stats_interval_s`."""
        published: dict[str, int] = {}
        last_log = time.monotonic()
        while not self._stopped.wait(0.5):
            tier = self.tier
            if tier is not None:  # host copies only: this thread must not touch the GPU (see OffloadTier)
                self.counters.values.update(tier.last_stats)
            values = dict(self.counters.values)
            if values != published:
                stats.publish(self.counters, self._stats_dir)
                published = values
            interval = self.cfg.stats_interval_s
            if interval and time.monotonic() - last_log >= interval:
                last_log = time.monotonic()
                if values["decode_steps"]:
                    logger.info("%s", stats.format_line(stats.read_totals(self._stats_dir)))

    def make_wrapper(self, *, num_qo_heads: int, dtype: torch.dtype, device: torch.device, max_batch: int,
                     max_pages: int):
        """The process's `SparseDecodeWrapper`, planned once for `max_batch` decode requests of `max_pages` pages."""
        if self.wrapper is None:
            from sparseserve_vllm.kernels import SparseDecodeWrapper

            c = self.cfg
            self.wrapper = SparseDecodeWrapper(
                num_qo_heads=num_qo_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_size,
                page_size=c.page_size, ppb=self.ppb, selector=c.selector, token_budget=c.token_budget,
                sink_pages=c.sink_pages, recent_pages=c.recent_pages, device=device, dtype=dtype,
                gqa_reduce=c.resolved_gqa_reduce,
            )
            self.wrapper.plan(max_batch, max_pages)
        return self.wrapper

    def set_logical_blocks(self, num_blocks: int) -> None:
        self.num_logical_blocks = num_blocks

    def tier_for(self, kv_cache: torch.Tensor):
        """The offload tier; its HBM page pool is vLLM's KV tensor, which every layer shares in offload mode."""
        if self.tier is None:
            from sparseserve_vllm.core.host_kv import HostKVStore
            from sparseserve_vllm.core.offload_tier import OffloadTier

            if self.num_logical_blocks is None:
                raise RuntimeError("sparseserve offload: the SparseServe KV connector did not report the block count")
            host = HostKVStore(self.num_layers, self.num_logical_blocks, self.num_kv_heads, self.block_size,
                               self.head_size, kv_cache.dtype, pin=kv_cache.is_cuda)
            logger.info("SparseServe offload: %.2f GiB of %s host KV (%d blocks), HBM page cache of %d pages",
                        host.nbytes / 2**30, "pinned" if host.pin else "plain", self.num_logical_blocks,
                        kv_cache.numel() // (self.cfg.page_size * kv_cache.shape[-1]))
            self.tier = OffloadTier(host=host, cache_pages=kv_cache.view(-1, self.cfg.page_size, kv_cache.shape[-1]),
                                    page_size=self.cfg.page_size, max_tokens=self.save_unit_tokens,
                                    staging_tokens=2 * self.save_unit_tokens)
            from sparseserve_vllm.core.working_set import WorkingSetTracker, page_bytes

            self.ws_tracker = WorkingSetTracker(
                self.num_layers, self.tier.pages_per_layer,
                page_bytes(page_size=self.cfg.page_size, head_dim=self.head_size, element_size=kv_cache.element_size()),
                window=self.cfg.working_set_window, device=kv_cache.device, check_bounds=False,
            )
            self._ws_report = LaggedRead(kv_cache.device, 2 * self.max_num_seqs)
        return self.tier

    def free_blocks(self, block_ids: list[int]) -> None:
        if self.tier is not None:
            pages = self.tier.free_blocks(torch.tensor(block_ids, dtype=torch.long))
            self.ws_tracker.forget(pages)
            self.tier.refresh_stats()  # pages in use, for the publisher (free_blocks synchronizes anyway)

    # ---- per step (offload) ----
    def begin_step(self, block_table: torch.Tensor, seq_lens_cpu: torch.Tensor, *, selects: bool) -> None:
        """Builder, offload, once per step before the forward: the tier's step start (when the tier exists: it is
        made at the first forward) and `note_decode_rows`."""
        if self.tier is not None:
            self.tier.begin_step()
        self.note_decode_rows(block_table, seq_lens_cpu, selects=selects)

    # ---- working set (offload) ----
    def note_decode_rows(self, block_table: torch.Tensor, seq_lens_cpu: torch.Tensor, *, selects: bool) -> None:
        """Builder, offload: the step's decode requests (their block table rows and lengths) for the next report;
        `selects`: sparse decode layers record selections this step (the report then closes a decode step)."""
        self._ws_open = self._ws_open or selects
        if self.ws_tracker is None or seq_lens_cpu.numel() == 0:
            self._ws_rows = None
            return
        bs, ps = self.block_size, self.cfg.page_size
        lens = seq_lens_cpu.to(torch.long)
        nb = int((lens.max() + bs - 1) // bs)
        dev = self.ws_tracker.device
        pages = self.tier.block_pages(block_table[:, :nb])  # [R, nb, Hkv, ppb]
        index = (torch.arange(nb)[:, None] * self.ppb + torch.arange(self.ppb))[None, :, None, :]  # page in request
        valid = upload(index < ((lens + ps - 1) // ps)[:, None, None, None], dev)
        owned = torch.where(valid, pages, -1).reshape(lens.numel(), -1)
        self._ws_rows = (block_table[:, 0].to(dev, torch.long), owned)

    def record_selection(self, layer: int, pages: torch.Tensor) -> None:
        """Impl, offload: the logical pages one sparse decode layer selected (-1 = none); device work only (the
        builder's `note_decode_rows` opened the step)."""
        if self.ws_tracker is not None:
            self.ws_tracker.record(layer, pages)

    def working_set_report(self, step: int) -> tuple[int, dict[int, int]] | None:
        """After the forward of step `step`, once per step, without a host sync: close the decode step, snapshot the
        working sets of its decode requests and return an earlier snapshot's `(step, {first block id: bytes})`
        (see the module docstring); None when there is none or it holds no request with a selection."""
        rows, self._ws_rows = self._ws_rows, None
        if self.ws_tracker is None:
            return None
        if self._ws_open:
            self.ws_tracker.end_step()
            self._ws_open = False
        if rows is None:
            taken = self._ws_report.take()
        else:
            first, owned = rows
            ws = self.ws_tracker.working_set_pages(owned) * self.ws_tracker.bytes_per_page
            taken = self._ws_report.swap(torch.cat([first, ws]), tag=step)
        if not taken:
            return None
        described, values = taken[-1]  # the newest complete snapshot (older ones are superseded)
        n = len(values) // 2
        report = {b: nbytes for b, nbytes in zip(values[:n], values[n:]) if nbytes > 0}
        return (described, report) if report else None

    def page_meta(self, layer_idx: int, kv_cache: torch.Tensor) -> torch.Tensor:
        meta = self._meta.get(layer_idx)
        blocks = self.num_logical_blocks if self.cfg.offload else kv_cache.shape[0]
        num_pages = blocks * self.num_kv_heads * self.ppb + (1 if self.cfg.offload else 0)  # offload: trash row
        if meta is None or meta.shape[0] != num_pages or meta.device != kv_cache.device:
            rows = num_meta_vectors(self.cfg.selector)
            meta = torch.zeros((num_pages, rows, self.head_size), dtype=kv_cache.dtype, device=kv_cache.device)
            self._meta[layer_idx] = meta
        return meta

    def count(self, **amounts: int) -> None:
        for k, v in amounts.items():
            self.counters.add(k, v)
