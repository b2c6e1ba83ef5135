"""`OffloadTier`: the hierarchical KV of one worker: every page in host DRAM, an LRU page cache in HBM.

Contract (all ids are LOGICAL: vLLM's block ids index the host store, which is larger than HBM):
- `host`: the authoritative `HostKVStore` `(layers, logical_blocks, Hkv, block_size, 2D)`; `cache_pages`: the HBM
  pool `(num_slots, page_size, 2D)`, one slot per (layer, KV head, page), shared by all layers; `cache`: the
  `PageCache` bookkeeping of which (layer, logical flat page) sits in which slot. The LAST slot of the pool
  (`trash_slot = num_slots - 1`) is the *trash page*: `cache` never hands it out (it manages `num_slots - 1`
  slots), and writes that must go nowhere (padding tokens, pages left without a slot) land there, so no write
  needs a boolean mask. Its contents are garbage; the pool needs at least 2 slots.
- Once per engine step, on the host, before the step's first layer: `begin_step()`: makes the earlier steps' saves
  visible to this step's loads (`flush`), snapshots the counters (`last_stats`, below), raises the page cache's
  deferred errors of the step before the previous one and recomputes the eviction ring (`PageCache.begin_step`),
  all without waiting for the GPU. vLLM's builder calls it, so it also runs before the replay of a CUDA graph,
  which runs none of the per-layer Python below.
- Per layer and step the caller runs, in this order:
    `begin_layer()`                 a new protection scope: pages resolved from now on are not evicted until the
                                    next call (a device-side stamp increment);
    `write_new(layer, k, v, slots)` makes every page that receives a new token resident (loading its older tokens
                                    from host when it was evicted; a page whose first token arrives in this write
                                    loads nothing) and writes the new tokens into it (write-through); -1 entries of
                                    `slots` (padding) write into the trash page;
    `resident_slots(layer, pages)`  cache slots of pages `write_new` just made resident (page summaries), no sync;
                                    -1 entries (padding) give -1, which indexes the trash page;
    `resolve(layer, flat_pages)`    selected pages -> cache slots, missing ones loaded by one FlashH2D launch;
    `gather_context(...)`           a request's whole context of one layer into a scratch buffer (dense prefill);
    `save(layer, k, v, slots)`      FlashD2H through the saver's ring and side stream (prefill and mixed steps;
                                    `save_blocks(layer, k, v, block_ids)` for whole blocks whose ids the host
                                    knows: a layer-segmented prompt), or
    `save_inline(layer, k, v, slots)` on the current stream (decode-only steps, CUDA-graph capturable): the new
                                    tokens to host DRAM, last, so that the loads above wait only for earlier saves.
                                    `staging_tokens` sizes the saver's ring (default 2 x `max_tokens`); a save
                                    larger than the ring makes the compute stream wait for PCIe, so callers that save
                                    more tokens at once (layer-segmented prefill) ask for two of their saves.
  `begin_layer`, `write_new`, `resident_slots`, `resolve` and `save_inline` perform no host synchronization, read no
  Python state that changes between steps and allocate only fixed-size temporaries (for fixed argument shapes):
  FlashH2D is planned once per layer and launched every time (-1 padded ids), and their flushes enqueue nothing
  after `begin_step` unless a ring `save` came in between. So a decode-only step is CUDA-graph capturable.
  `save` does not synchronize either; `gather_context` does (prefill only).
- Pages that got no slot because the cache could not hold them (or ids out of range) do not raise at once: their
  tokens go to the trash page, `resolve` returns -1 for them, and the error (`CacheCapacityError` or
  `ValueError`) is raised one step late, by the `begin_step()` after next (the next one snapshots it without a
  host sync; on CUDA, a later one if the GPU is behind), or at once by `check()` (synchronous).
- `free_blocks(block_ids)`: finished or aborted requests give their pages' cache slots back.
- Host data written by `save` becomes visible to loads after `flush()`; `write_new`, `resolve` and
  `gather_context` flush before they load, so a load never reads a page older than what this process saved.
- Counters (device tensors, updated without a sync, also inside CUDA graphs): `stats()` returns hits, misses,
  evictions, bytes moved each way (d2h: tokens with a slot id >= 0), HBM pages in use (synchronizes).
  `last_stats` holds them as plain ints for other threads (the runtime's stats publisher), which must never touch
  the GPU (during vLLM's CUDA-graph capture, in the default "global" capture mode, a GPU sync or allocation from
  another thread invalidates it). `begin_step` snapshots them without a host sync (`LaggedRead`) and puts the
  newest earlier snapshot whose copy is done there, so they lag a step (on CUDA, more while the GPU is behind): at
  step N they are the counters as of the start of step N - 1. `refresh_stats()` and `stats()` read them now (one
  host sync); a snapshot taken before such a read is then not put there (`last_stats` never goes back in time).
No vLLM import.
"""

from __future__ import annotations

import torch

from sparseserve_vllm.core.flash_d2h import FlashD2HSaver
from sparseserve_vllm.core.host_kv import HostKVStore
from sparseserve_vllm.core.lagged_read import LaggedRead
from sparseserve_vllm.core.page_cache import PageCache
import sparseserve_vllm.kernels.flash_h2d as flash_h2d_module
from sparseserve_vllm.kernels.flash_h2d import FlashH2D, flash_h2d, flash_h2d_torch
from sparseserve_vllm.kernels.write_through import token_pages, write_through


class OffloadTier:
    def __init__(
        self,
        *,
        host: HostKVStore,
        cache_pages: torch.Tensor,
        page_size: int,
        max_tokens: int,
        staging_tokens: int | None = None,
        h2d_sms: int | None = None,
        d2h_threads: int = 4,
        eviction_window: int | None = None,
    ) -> None:
        if cache_pages.dim() != 3 or cache_pages.shape[0] < 2:
            raise ValueError(f"cache_pages must be (num_slots >= 2, page_size, 2D) (the last slot is the trash page), "
                             f"got {tuple(cache_pages.shape)}")
        self.host = host
        self.page_size = page_size
        self.ppb = host.block_size // page_size
        self.num_kv_heads = host.num_kv_heads
        self.cache_pages = cache_pages
        self.device = cache_pages.device
        self.pages_per_layer = host.num_logical_blocks * host.num_kv_heads * self.ppb
        self.trash_slot = cache_pages.shape[0] - 1
        # The tier's kernels (page cache, FlashH2D, write-through) run in Triton where FlashH2D's kernel can (CUDA, or
        # the CPU under TRITON_INTERPRET=1), with their torch paths elsewhere.
        self._backend = "triton" if self.device.type == "cuda" or flash_h2d_module._INTERPRET else "torch"
        self.cache = PageCache(host.num_layers, self.pages_per_layer, self.trash_slot, device=self.device,
                               window=eviction_window, backend=self._backend)
        self.saver = FlashD2HSaver(host, max_tokens=max_tokens, num_threads=d2h_threads, device=self.device,
                                   staging_tokens=staging_tokens)
        self.h2d_sms = h2d_sms
        self._h2d: list[FlashH2D | None] = [None] * host.num_layers  # planned on a layer's first load
        self.page_bytes = cache_pages[0].numel() * cache_pages.element_size()
        self.token_bytes = host.num_kv_heads * 2 * host.head_dim * cache_pages.element_size()
        self._pages_h2d = torch.zeros((), dtype=torch.int64, device=self.device)  # gather_context's loaded pages
        # (the page cache counts the pages its resolves hand over to load: `cache.loads`)
        self._tokens_d2h = torch.zeros((), dtype=torch.int64, device=self.device)  # tokens saved, on the device
        self._heads = torch.arange(self.num_kv_heads, device=self.device)
        # Counters as of the last host read (a begin_step snapshot, refresh_stats, stats): plain ints that another
        # thread may read without touching the GPU (a GPU sync from another thread during a CUDA-graph capture breaks
        # it).
        self.last_stats: dict[str, int] = dict.fromkeys(
            ("hbm_hits", "hbm_misses", "hbm_evictions", "hbm_pages_in_use", "bytes_h2d", "bytes_d2h"), 0)
        self._stats_snapshot = LaggedRead(self.device, 7)  # begin_step's, tagged with `_sync_reads` at the time
        self._sync_reads = 0  # refresh_stats calls: a snapshot tagged with an older count is older than last_stats

    # ---- per step and layer ----
    def begin_step(self) -> None:
        """Start an engine step (host side, before its first layer), without waiting for the GPU: flush, counters
        snapshotted (the previous snapshot goes to `last_stats`), deferred errors of the step before the previous
        one raised, new eviction ring."""
        self.flush()
        for sync_reads, values in self._stats_snapshot.swap(self._counter_tensor(), tag=self._sync_reads):
            if sync_reads == self._sync_reads:  # oldest first: the newest snapshot not older than last_stats stays
                self._keep_stats(values)
        self.cache.begin_step()

    def begin_layer(self) -> None:
        """New protection scope for the next layer (on the device)."""
        self.cache.begin_layer()

    def check(self) -> None:
        """Raise the page cache's deferred errors not raised yet, now (one host sync)."""
        self.cache.check()

    def save(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.saver.save(layer, key, value, slot_mapping)  # -1 slots are padding; rows past len(slot_mapping) ignored
        self._count_saved(slot_mapping)

    def save_blocks(self, layer: int, key: torch.Tensor, value: torch.Tensor, block_ids) -> None:
        self.saver.save_blocks(layer, key, value, block_ids)  # whole blocks, ids on the CPU
        self._tokens_d2h += len(block_ids) * self.host.block_size

    def save_inline(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.saver.save_inline(layer, key, value, slot_mapping, saved=self._tokens_d2h)  # the kernel counts

    def _count_saved(self, slot_mapping: torch.Tensor) -> None:
        self._tokens_d2h += (slot_mapping >= 0).sum().to(self.device)

    def flush(self) -> None:
        self.saver.flush()

    def token_pages(self, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Logical flat page ids [T, Hkv] of the tokens at `slot_mapping` (-1 for -1 padding)."""
        pages, _ = token_pages(slot_mapping, block_size=self.host.block_size, page_size=self.page_size,
                               num_kv_heads=self.num_kv_heads, backend="torch")
        return pages.view(-1, self.num_kv_heads)

    def write_new(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write the tokens of `key`/`value` ([>= T, Hkv, D]) at `slot_mapping` ([T], -1 = padding) through into
        their cache pages, making those resident first (see the module docstring). No host sync."""
        if slot_mapping.numel() == 0:
            return
        # A missing page whose offset-0 token is in this write has no older tokens (`fresh`): the cache loads nothing
        # for it.
        pages, fresh = token_pages(slot_mapping, block_size=self.host.block_size, page_size=self.page_size,
                                   num_kv_heads=self.num_kv_heads, backend=self._backend)
        cache_slots, miss_pages, miss_slots = self.cache.resolve(layer, pages, fresh)
        self._load(layer, miss_pages, miss_slots)
        write_through(self.cache_pages, key, value, slot_mapping, cache_slots, page_size=self.page_size,
                      trash_slot=self.trash_slot, backend=self._backend)

    def resolve(self, layer: int, flat_pages: torch.Tensor) -> torch.Tensor:
        """Cache slots (int32, -1 for -1 entries and pages left without a slot) of `flat_pages` of `layer`; the
        misses are loaded from host. No host sync."""
        slots, miss_pages, miss_slots = self.cache.resolve(layer, flat_pages)
        self._load(layer, miss_pages, miss_slots)
        return slots

    def _load(self, layer: int, pages: torch.Tensor, slots: torch.Tensor) -> None:
        """FlashH2D of host `pages` of `layer` into cache `slots` (-1 pairs skipped), after every earlier save is
        visible. Always launched: how many pairs are real is known on the device only. A CPU pool without the
        Triton interpreter uses the torch path (which synchronizes; there is no device to wait for)."""
        if pages.numel() == 0:
            return
        if self._backend == "torch":
            self.flush()
            flash_h2d_torch(self.host.pages(layer, self.page_size), self.cache_pages, pages, slots)
            return
        op = self._h2d[layer]
        if op is None:
            op = self._h2d[layer] = FlashH2D(num_sms=self.h2d_sms).plan(self.host.pages(layer, self.page_size),
                                                                         self.cache_pages)
        self.flush()
        op.run(pages, slots)

    def resident_slots(self, layer: int, flat_pages: torch.Tensor) -> torch.Tensor:
        """Cache slots (int32) of pages known to be resident, e.g. those `write_new` just wrote this layer-step:
        a lookup without eviction, range checks or host sync (-1 for a page that is not cached and for -1 padding:
        as an index into `cache_pages` that reads the trash page)."""
        return self.cache.lookup(layer, flat_pages, check_range=False)

    def gather_context(self, layer: int, block_ids: torch.Tensor, length: int, key: torch.Tensor | None = None,
                       value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ([Hkv, length, D]) of a request's first `length` tokens of `layer`; the last `key.shape[0]`
        tokens are taken from `key`/`value` ([T, Hkv, D], this step's tokens), the rest loaded from host."""
        ps, h = self.page_size, self.num_kv_heads
        n_new = 0 if key is None else key.shape[0]
        n_old = length - n_new
        n_pages = -(-length // ps)
        scratch = torch.empty((h * n_pages, ps, self.cache_pages.shape[-1]), dtype=self.cache_pages.dtype, device=self.device)
        old_pages = -(-n_old // ps)
        if old_pages:
            p = torch.arange(old_pages, device=self.device)
            blocks = block_ids.to(self.device, torch.long)[p // self.ppb]
            src = ((blocks[None, :] * h + self._heads[:, None]) * self.ppb + (p % self.ppb)[None, :]).reshape(-1)
            dst = (self._heads[:, None] * n_pages + p[None, :]).reshape(-1)
            self.flush()
            flash_h2d(self.host.pages(layer, ps), scratch, src, dst, num_sms=self.h2d_sms)
            self._pages_h2d += src.numel()
        ctx = scratch.view(h, n_pages * ps, -1)[:, :length]
        d = ctx.shape[-1] // 2
        if n_new:
            ctx[:, n_old:, :d] = key.transpose(0, 1).to(ctx.dtype)
            ctx[:, n_old:, d:] = value.transpose(0, 1).to(ctx.dtype)
        return ctx[..., :d], ctx[..., d:]

    # ---- request lifecycle ----
    def block_pages(self, blocks: torch.Tensor) -> torch.Tensor:
        """Logical flat page ids `[*blocks.shape, Hkv, ppb]` of every KV head's pages of `blocks` (on this device)."""
        blocks = blocks.to(self.device, torch.long)
        j = torch.arange(self.ppb, device=self.device)
        return (blocks[..., None, None] * self.num_kv_heads + self._heads[:, None]) * self.ppb + j

    def free_blocks(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Give the cache slots of these blocks' pages back; returns the pages (flat, for other bookkeeping)."""
        pages = self.block_pages(block_ids.reshape(-1)).reshape(-1)
        if pages.numel():
            self.cache.invalidate(None, pages)
        return pages

    def stats(self) -> dict[str, int]:
        """The counters now (one host sync, on the caller's current stream; see `last_stats` for other threads)."""
        self.refresh_stats()
        return dict(self.last_stats)

    def refresh_stats(self) -> None:
        """Read the counters into `last_stats` now (one host sync); the pending `begin_step` snapshot, older, will
        not replace them."""
        self._keep_stats(self._counter_tensor().tolist())
        self._sync_reads += 1

    def _counter_tensor(self) -> torch.Tensor:
        return torch.cat([self.cache.counter_tensor(), self._pages_h2d.view(1), self._tokens_d2h.view(1)])

    def _keep_stats(self, values: list[int]) -> None:
        hits, misses, evictions, loads, used, pages_h2d, tokens_d2h = values
        self.last_stats = {
            "hbm_hits": hits,
            "hbm_misses": misses,
            "hbm_evictions": evictions,
            "hbm_pages_in_use": used,
            "bytes_h2d": (loads + pages_h2d) * self.page_bytes,
            "bytes_d2h": tokens_d2h * self.token_bytes,
        }

    def close(self) -> None:
        self.saver.close()
