"""`PageCache`: bookkeeping of the HBM tier's LRU cache of KV pages (no data movement).

Contract:
- Keys are `(layer, page)` with `0 <= layer < num_layers` and `0 <= page < num_logical_pages`, where `page` is a
  logical flat page id `(block * Hkv + head) * ppb + page_in_block` over the LOGICAL block space (the full KV
  held in host DRAM, larger than HBM). Values are cache slot ids `0 .. num_slots - 1`; one slot holds one page
  and slots are shared by all layers.
- All state lives in torch tensors on `device`; every operation is vectorized (no Python loop per page), so it
  runs on GPU as on CPU:
    `resident`  int32 [num_layers, num_logical_pages]: slot of the key, -1 when not cached;
    `owner`     int64 [num_slots]: `layer * num_logical_pages + page` of the slot's key, -1 when free;
    `last_use`  int64 [num_slots]: stamp of the slot's last use, -1 exactly when the slot is free;
    `hits`, `misses`, `evictions`: int64 scalar tensors on `device`, updated without a host sync.
- Stamps: `begin_step()` advances the stamp (it starts at 0); all `resolve` calls between two `begin_step` calls
  share one stamp, and a slot used at the current stamp is never evicted.
- `resolve(layer, pages)`: `pages` is a 1-D integer tensor; `-1` entries are padding (ignored, slot -1 returned)
  and duplicates are allowed (every copy gets the same slot; the key is counted once). Exact semantics, also
  implemented by the reference model in the tests:
    1. keys already cached (hits) get their slot and their `last_use` becomes the current stamp;
    2. the distinct missing pages, in ascending page order, take the slots that are free or whose `last_use` is
       older than the current stamp, in ascending `(last_use, slot id)` order; free slots (`last_use == -1`)
       therefore come first, lowest slot id first, then the least-recently-used slots;
    3. an occupied slot that is taken is evicted: its key's `resident` entry becomes -1;
    4. if more pages miss than slots can be taken, `CacheCapacityError` is raised and nothing changes.
  It returns `(slots int32 [N], miss_pages int64 [M], miss_slots int32 [M])`: the slot of every entry of `pages`,
  and the missing pages with the slots they were given. The caller then copies `miss_pages` from host DRAM into
  `miss_slots`. `resolve` synchronizes with the host (the number of misses is data dependent): twice when every
  page hits, three times when some miss.
- `lookup` reads slots without touching; `invalidate` drops keys and frees their slots (request finished or
  aborted); `reset` empties the cache and zeroes the counters and the stamp.
- Page ids outside `[-1, num_logical_pages)` and layers outside `[0, num_layers)` raise `ValueError`.
"""

from __future__ import annotations

import torch

__all__ = ["CacheCapacityError", "PageCache"]

_TAKEN = torch.iinfo(torch.int64).max  # eviction priority of a slot that cannot be taken


class CacheCapacityError(RuntimeError):
    """More pages missed in one `resolve` than the cache can hold without evicting pages of the current step."""


class PageCache:
    def __init__(self, num_layers: int, num_logical_pages: int, num_slots: int, device: torch.device | str = "cpu"):
        for name, value in (("num_layers", num_layers), ("num_logical_pages", num_logical_pages), ("num_slots", num_slots)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.num_layers = num_layers
        self.num_logical_pages = num_logical_pages
        self.num_slots = num_slots
        self.device = torch.empty(0, device=device).device  # normalized, e.g. "cuda" -> cuda:0
        # Each buffer has one trailing "trash" element: masked-out writes are redirected there, so writes need no
        # boolean-mask indexing (which would synchronize with the host). The trash of `_resident` is always -1.
        num_keys = num_layers * num_logical_pages
        self._resident = torch.full((num_keys + 1,), -1, dtype=torch.int32, device=self.device)
        self._owner = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=self.device)
        self._last_use = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=self.device)
        self._slot_ids = torch.arange(num_slots + 1, dtype=torch.int64, device=self.device)
        self.hits = torch.zeros((), dtype=torch.int64, device=self.device)
        self.misses = torch.zeros((), dtype=torch.int64, device=self.device)
        self.evictions = torch.zeros((), dtype=torch.int64, device=self.device)
        self.stamp = 0

    # ----------------------------------------------------------------------------------------------------- state
    @property
    def resident(self) -> torch.Tensor:
        """int32 [num_layers, num_logical_pages]: slot of each key, -1 when not cached (a view; do not write)."""
        return self._resident[:-1].view(self.num_layers, self.num_logical_pages)

    @property
    def owner(self) -> torch.Tensor:
        """int64 [num_slots]: `layer * num_logical_pages + page` held by each slot, -1 when free (a view)."""
        return self._owner[:-1]

    @property
    def last_use(self) -> torch.Tensor:
        """int64 [num_slots]: stamp of each slot's last use, -1 when free (a view)."""
        return self._last_use[:-1]

    @property
    def num_used_slots(self) -> int:
        return int((self.owner >= 0).sum().item())

    @property
    def num_free_slots(self) -> int:
        return self.num_slots - self.num_used_slots

    def stats(self) -> dict[str, int]:
        """Counters and occupancy as Python ints (synchronizes with the host)."""
        hits, misses, evictions, used = torch.stack(
            [self.hits, self.misses, self.evictions, (self.owner >= 0).sum()]
        ).tolist()
        return {
            "hits": hits,
            "misses": misses,
            "evictions": evictions,
            "used_slots": used,
            "free_slots": self.num_slots - used,
            "num_slots": self.num_slots,
            "stamp": self.stamp,
        }

    # ------------------------------------------------------------------------------------------------ operations
    def begin_step(self) -> None:
        """Start a new step: slots used before it become evictable again."""
        self.stamp += 1

    def reset(self) -> None:
        self._resident.fill_(-1)
        self._owner.fill_(-1)
        self._last_use.fill_(-1)
        self.hits.zero_()
        self.misses.zero_()
        self.evictions.zero_()
        self.stamp = 0

    def lookup(self, layer: int, pages: torch.Tensor) -> torch.Tensor:
        """int32 slots of `pages` in `layer` (-1 when not cached or for -1 padding); touches nothing."""
        self._check_layer(layer)
        pages = self._check_pages(pages)
        lo, hi = torch.stack([pages.min(), pages.max()]).tolist() if pages.numel() else (0, 0)
        self._check_range(lo, hi)
        return self._resident[self._flat_keys(layer, pages)]

    def invalidate(self, layer: int | None, pages: torch.Tensor) -> None:
        """Drop the keys `(layer, p)` for `p` in `pages` (every layer when `layer` is None) and free their slots.

        -1 entries and pages that are not cached are ignored.
        """
        if layer is not None:
            self._check_layer(layer)
        pages = self._check_pages(pages)
        if pages.numel() == 0:
            return
        self._check_range(*torch.stack([pages.min(), pages.max()]).tolist())
        if layer is None:
            layers = torch.arange(self.num_layers, dtype=torch.int64, device=self.device)
            keys = torch.where(
                pages >= 0, layers[:, None] * self.num_logical_pages + pages[None, :], self.num_layers * self.num_logical_pages
            ).reshape(-1)
        else:
            keys = self._flat_keys(layer, pages)
        slots = self._resident[keys].to(torch.int64)
        slots = torch.where(slots >= 0, slots, self.num_slots)  # not cached -> trash slot
        self._owner[slots] = -1
        self._last_use[slots] = -1
        self._resident[keys] = -1

    def resolve(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Map `pages` of `layer` to cache slots, assigning slots to the misses (see the module docstring)."""
        self._check_layer(layer)
        pages = self._check_pages(pages)
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        if pages.numel() == 0:
            return empty.to(torch.int32), empty, empty.to(torch.int32)
        uniq = torch.unique(pages)  # sorted ascending; host sync for its size
        valid = uniq >= 0
        # Clamped so that out-of-range ids (rejected below, before any write) index safely.
        slots_u = torch.where(valid, self._resident[self._flat_keys(layer, uniq.clamp(max=self.num_logical_pages - 1))], -1)
        slots_u = slots_u.to(torch.int64)
        hit = slots_u >= 0
        miss = valid & ~hit
        hit_slots = torch.where(hit, slots_u, self.num_slots)  # non-hits -> trash slot
        # Eviction priority of each slot, unique: (last_use, slot id) packed in one int64. Slots that cannot be
        # taken (used at this stamp, hit by this call, or the trash slot) get TAKEN and sort last.
        priority = torch.where(self._last_use < self.stamp, self._last_use * self.num_slots + self._slot_ids, _TAKEN)
        priority[hit_slots] = _TAKEN
        priority[self.num_slots] = _TAKEN
        lo, hi, num_valid, num_miss, num_takeable = torch.stack(
            [uniq[0], uniq[-1], valid.sum(), miss.sum(), (priority != _TAKEN).sum()]
        ).tolist()
        self._check_range(lo, hi)
        if num_miss > num_takeable:
            raise CacheCapacityError(
                f"page cache: layer {layer} needs {num_miss} slots for missing pages but only {num_takeable} of "
                f"{self.num_slots} slots can be taken (the others hold pages used at step stamp {self.stamp}); "
                f"enlarge the cache or admit fewer requests"
            )
        self._last_use[hit_slots] = self.stamp
        self.hits += num_valid - num_miss
        self.misses += num_miss
        if num_miss == 0:
            return self._resident[self._flat_keys(layer, pages)], empty, empty.to(torch.int32)

        miss_pages = uniq[miss]
        victims = torch.topk(priority, num_miss, largest=False, sorted=True).indices
        old_keys = self._owner[victims]
        evicted = old_keys >= 0
        self._resident[torch.where(evicted, old_keys, self.num_layers * self.num_logical_pages)] = -1
        self.evictions += evicted.sum()
        new_keys = layer * self.num_logical_pages + miss_pages
        self._owner[victims] = new_keys
        self._last_use[victims] = self.stamp
        miss_slots = victims.to(torch.int32)
        self._resident[new_keys] = miss_slots
        return self._resident[self._flat_keys(layer, pages)], miss_pages, miss_slots

    # ------------------------------------------------------------------------------------------------- helpers
    def _flat_keys(self, layer: int, pages: torch.Tensor) -> torch.Tensor:
        """Index into `_resident` of each `(layer, page)`; -1 padding maps to the trash entry."""
        return torch.where(pages >= 0, layer * self.num_logical_pages + pages, self.num_layers * self.num_logical_pages)

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def _check_pages(self, pages: torch.Tensor) -> torch.Tensor:
        if not isinstance(pages, torch.Tensor) or pages.dim() != 1:
            raise ValueError(f"pages must be a 1-D integer tensor, got {pages!r:.80}")
        if pages.dtype.is_floating_point or pages.dtype.is_complex or pages.dtype == torch.bool:
            raise ValueError(f"pages must have an integer dtype, got {pages.dtype}")
        if pages.device != self.device:
            raise ValueError(f"pages must be on the cache's device {self.device}, got {pages.device}")
        return pages.to(torch.int64)

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < -1 or hi >= self.num_logical_pages:
            raise ValueError(
                f"pages must be logical flat page ids in [0, {self.num_logical_pages}) or -1 (padding); "
                f"got values in [{lo}, {hi}]"
            )
