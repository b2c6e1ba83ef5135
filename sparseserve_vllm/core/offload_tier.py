"""`OffloadTier`: the hierarchical KV of one worker: every page in host DRAM, an LRU page cache in HBM.

Contract (all ids are LOGICAL: vLLM's block ids index the host store, which is larger than HBM):
- `host`: the authoritative `HostKVStore` `(layers, logical_blocks, Hkv, block_size, 2D)`; `cache_pages`: the HBM
  pool `(num_slots, page_size, 2D)`, one slot per (layer, KV head, page), shared by all layers; `cache`: the
  `PageCache` bookkeeping of which (layer, logical flat page) sits in which slot.
- Per layer and step the caller runs, in this order:
    `begin_layer()`                 pages resolved from now on are protected from eviction until the next call;
    `write_new(layer, k, v, slots)` makes every page that receives a new token resident (loading its older tokens
                                    from host when it was evicted; a page whose first token arrives now loads
                                    nothing) and writes the new tokens into it (write-through);
    `resident_slots(layer, pages)`  cache slots of pages `write_new` just made resident (page summaries), no sync;
    `resolve(layer, flat_pages)`    selected pages -> cache slots, missing ones loaded by one FlashH2D launch;
    `gather_context(...)`           a request's whole context of one layer into a scratch buffer (dense prefill);
    `save(layer, k, v, slots)`      FlashD2H: the new tokens to host DRAM, last, so that the loads above wait
                                    only for earlier layers' saves.
- `free_blocks(block_ids)`: finished or aborted requests give their pages' cache slots back.
- Host data written by `save` becomes visible to loads after `flush()`; `write_new`/`gather_context` flush first
  when they have to load from host, so a load never reads a page older than what this process saved.
- Counters: `stats()` returns hits, misses, evictions, bytes moved each way, HBM pages in use.
No vLLM import.
"""

from __future__ import annotations

import torch

from sparseserve_vllm.core.flash_d2h import FlashD2HSaver
from sparseserve_vllm.core.host_kv import HostKVStore
from sparseserve_vllm.core.page_cache import PageCache
from sparseserve_vllm.kernels.flash_h2d import flash_h2d


class OffloadTier:
    def __init__(
        self,
        *,
        host: HostKVStore,
        cache_pages: torch.Tensor,
        page_size: int,
        max_tokens: int,
        h2d_sms: int | None = None,
        d2h_threads: int = 4,
    ) -> None:
        self.host = host
        self.page_size = page_size
        self.ppb = host.block_size // page_size
        self.num_kv_heads = host.num_kv_heads
        self.cache_pages = cache_pages
        self.device = cache_pages.device
        self.pages_per_layer = host.num_logical_blocks * host.num_kv_heads * self.ppb
        self.cache = PageCache(host.num_layers, self.pages_per_layer, cache_pages.shape[0], device=self.device)
        self.saver = FlashD2HSaver(host, max_tokens=max_tokens, num_threads=d2h_threads, device=self.device)
        self.h2d_sms = h2d_sms
        self.page_bytes = cache_pages[0].numel() * cache_pages.element_size()
        self.token_bytes = host.num_kv_heads * 2 * host.head_dim * cache_pages.element_size()
        self.bytes_h2d = 0
        self.bytes_d2h = 0
        self._heads = torch.arange(self.num_kv_heads, device=self.device)

    # ---- per layer ----
    def begin_layer(self) -> None:
        self.cache.begin_step()

    def save(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.saver.save(layer, key, value, slot_mapping)  # -1 slots are padding; rows past len(slot_mapping) ignored
        self.bytes_d2h += slot_mapping.numel() * self.token_bytes

    def flush(self) -> None:
        self.saver.flush()

    def token_pages(self, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Logical flat page ids [T, Hkv] of the tokens at `slot_mapping` (which must hold no -1)."""
        bs = self.host.block_size
        block = slot_mapping // bs
        pib = (slot_mapping % bs) // self.page_size
        return (block[:, None] * self.num_kv_heads + self._heads[None, :]) * self.ppb + pib[:, None]

    def write_new(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        keep = slot_mapping >= 0
        slots_in = slot_mapping[keep].to(torch.long)
        if slots_in.numel() == 0:
            return
        key, value = key[: slot_mapping.numel()][keep], value[: slot_mapping.numel()][keep]
        pages = self.token_pages(slots_in)  # [T, Hkv]
        off = slots_in % self.page_size
        cache_slots, miss_pages, miss_slots = self.cache.resolve(layer, pages.reshape(-1))
        if miss_pages.numel():
            older = ~torch.isin(miss_pages, pages[off == 0].reshape(-1))  # offset 0 now: no older tokens
            self._load(layer, miss_pages[older], miss_slots[older])
        cache_slots = cache_slots.view(pages.shape).to(torch.long)
        d = key.shape[-1]
        self.cache_pages[cache_slots, off[:, None], :d] = key.to(self.cache_pages.dtype)
        self.cache_pages[cache_slots, off[:, None], d:] = value.to(self.cache_pages.dtype)

    def resolve(self, layer: int, flat_pages: torch.Tensor) -> torch.Tensor:
        """Cache slots (int32, -1 for -1 entries) of `flat_pages` of `layer`; misses are loaded from host."""
        slots, miss_pages, miss_slots = self.cache.resolve(layer, flat_pages)
        self._load(layer, miss_pages, miss_slots)
        return slots

    def _load(self, layer: int, pages: torch.Tensor, slots: torch.Tensor) -> None:
        """FlashH2D of host `pages` of `layer` into cache `slots`, after every earlier save is visible."""
        if pages.numel():
            self.flush()
            flash_h2d(self.host.pages(layer, self.page_size), self.cache_pages, pages, slots, num_sms=self.h2d_sms)
            self.bytes_h2d += pages.numel() * self.page_bytes

    def resident_slots(self, layer: int, flat_pages: torch.Tensor) -> torch.Tensor:
        """Cache slots (int32) of pages known to be resident, e.g. those `write_new` just wrote this layer-step:
        a lookup without eviction, checks or host sync (-1 for a page that is not cached)."""
        return self.cache.resident[layer][flat_pages]

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
            self.bytes_h2d += src.numel() * self.page_bytes
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
        s = self.cache.stats()
        return {
            "hbm_hits": s["hits"],
            "hbm_misses": s["misses"],
            "hbm_evictions": s["evictions"],
            "hbm_pages_in_use": s["used_slots"],
            "bytes_h2d": self.bytes_h2d,
            "bytes_d2h": self.bytes_d2h,
        }

    def close(self) -> None:
        self.saver.close()
