"""`PageCache`: bookkeeping of the HBM tier's LRU cache of KV pages (no data movement), free of host syncs.

Contract:
- Keys are `(layer, page)` with `0 <= layer < num_layers` and `0 <= page < num_logical_pages`, where `page` is a
  logical flat page id `(block * Hkv + head) * ppb + page_in_block` over the LOGICAL block space (the full KV
  held in host DRAM, larger than HBM). Values are cache slot ids `0 .. num_slots - 1`; one slot holds one page
  and slots are shared by all layers.
- All state lives in torch tensors on `device`; every operation is vectorized (no Python loop per page), so it
  runs on GPU as on CPU. Read-only views (each access may build a small tensor; not for the hot path):
    `resident`  int32 [num_layers, num_logical_pages]: slot of the key, -1 when not cached;
    `owner`     int64 [num_slots]: `layer * num_logical_pages + page` of the slot's key, -1 when free;
    `last_use`  int64 [num_slots]: stamp of the slot's last use, -1 exactly when the slot is free;
    `hits`, `misses`, `evictions`, `loads`: int64 scalar tensors on `device`, updated without a host sync.
- Stamps and steps. The stamp (an int64 scalar tensor on `device`, starting at 0; `stamp` reads it as an int,
  synchronizing) names the current *scope*; a slot touched or taken in the current scope (`last_use == stamp`) is
  protected: it is never taken by a `resolve` of the same scope.
    `begin_step()`  once per engine step, on the host before the step's work, without waiting for the GPU: the
                    deferred errors (below), stamp += 1, and the *eviction ring* is recomputed: all slots sorted by
                    `(last_use, slot id)` ascending (free slots first, lowest id first, then least recently used),
                    with the ring *cursor* at position 0;
    `begin_layer()` a new scope inside the step (the tier calls it for every layer): stamp += 1 on the device, the
                    ring and its cursor are kept. No host sync and no Python state: CUDA-graph capturable.
  `invalidate` and `reset` recompute the ring too (cursor 0), so freed slots come first.
- `resolve(layer, pages, fresh=None)`: `pages` is a 1-D integer tensor of length N; `-1` entries are padding and
  duplicates are allowed (every copy gets the same slot; a key is counted once). `fresh` (None or a bool tensor of N)
  marks entries whose page, if missing, needs no load (its older tokens do not exist: the caller writes all of it).
  Exact semantics, also implemented by the reference model in the tests:
    0. ids outside `[-1, num_logical_pages)` are counted as *bad* and treated as padding;
    1. cached keys (hits) get their slot and their `last_use` becomes the stamp;
    2. the *window* is the `W = min(window, num_slots)` ring positions `cursor, cursor + 1, ..` (modulo
       num_slots); its *takeable* slots are those with `last_use < stamp` after step 1, in window order;
    3. each distinct missing page has a *representative* entry: its first `fresh` entry if it has one, else its
       first entry; the missing pages, in the order of their representatives' positions in `pages`, take the
       takeable slots in window order, one each: the k-th missing page gets the k-th takeable slot. An occupied
       slot that is taken is evicted (its key's `resident` entry becomes -1); a taken slot gets the key and
       `last_use = stamp`;
    4. if there are more missing pages than takeable slots, the pages beyond them get NO slot (slot -1, not
       cached) and are counted as *unplaced*; nothing raises here;
    5. the cursor moves to the position just after the last slot taken (it stays when none is taken).
  Counters: hits += distinct cached pages, misses += distinct missing pages (placed or not), evictions += taken
  slots that held a key, loads += the pages it hands the caller to load (placed, representative not fresh). It
  returns three tensors of length N on `device`:
    `slots`       int32: the slot of every entry of `pages` after the call (-1 for padding, bad and unplaced ids);
    `miss_pages`  int64: for the k-th missing page that got a slot, at position k - 1: the page, or -1 when its
                  representative is fresh (nothing to load); then -1;
    `miss_slots`  int32: the slots they got, aligned with `miss_pages`, then -1.
  The caller copies `miss_pages` from host DRAM into `miss_slots` (FlashH2D skips the -1 pairs). `resolve`
  performs no host synchronization, no boolean-mask indexing and no `unique`/`nonzero`. Two implementations with
  one behaviour, chosen by `backend`: `"triton"` (one kernel launch per call, five beyond 1024 ids,
  `kernels/page_cache_resolve.py`; the default on CUDA, and on the CPU under `TRITON_INTERPRET=1` when asked
  for) and `"torch"` (about forty tensor operations: a sort of the N ids, then a scan of the window; the default
  elsewhere). It scans a W-slot window (W defaults to num_slots: then step 4 happens only when the cache truly
  cannot hold the misses without evicting a protected slot; a smaller `window` is cheaper but can leave pages
  unplaced earlier).
  The scan itself stops early without changing any result: a scope protects at most as many slots as the ids its
  resolves were given (each distinct id touches or takes one slot), so the first `min(W, ids of the scope so far
  including this call)` window positions always hold a takeable slot for every miss of this call, and the misses
  take the same slots as over all W. (The count of a scope's ids is Python state that depends on argument shapes
  only, so a captured CUDA graph replays the same scan length.)
- Errors of `resolve` are deferred: they are counted on the device (bad ids -> `ValueError`, else unplaced pages
  -> `CacheCapacityError`) and raised on the host later, by one of:
    `begin_step()`  without a host sync: it snapshots the counts into pinned host memory (`LaggedRead`: a
                    non-blocking copy and a CUDA event) and clears them on the device, then raises the counts of
                    the earlier snapshots whose copies are done (normally the one the PREVIOUS `begin_step` made),
                    before it opens its scope. So the errors of the resolves of step N (between the starts of steps
                    N and N + 1) are raised by the start of step N + 2: one step after the step that made them ends
                    (on CUDA, if the GPU is still behind then, by the start of step N + 3, which waits for it). The
                    CPU runs the same code, with the one-step lag;
    `check()`       synchronously (one host sync): every count not raised yet, the pending snapshots' included
                    (tests, shutdown).
  Each raises once, then the counts are clear. A step that left pages unplaced attended to garbage for them (the
  slot its caller substituted for -1), and so may the next, before the error is raised; bad ids were read as
  padding.
- `lookup` reads slots without touching; `invalidate` drops keys and frees their slots (request finished or
  aborted); `reset` empties the cache and zeroes the counters, the deferred errors (pending snapshots' too)
  and the stamp. These three and `stats`/`num_used_slots` may synchronize (they are not on the per-layer path);
  `lookup` and `invalidate` raise `ValueError` for ids outside `[-1, num_logical_pages)`, except
  `lookup(..., check_range=False)`, which checks no values and does not synchronize (the tier's page summaries
  use it). Every method raises `ValueError` for a
  layer outside `[0, num_layers)` or a `pages` argument that is not a 1-D integer tensor on `device`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseserve_vllm.core.lagged_read import LaggedRead
from sparseserve_vllm.kernels.pages import resolve_backend

__all__ = ["CacheCapacityError", "PageCache"]


class CacheCapacityError(RuntimeError):
    """Missing pages could not be given a slot without evicting pages protected in their scope."""


class PageCache:
    def __init__(self, num_layers: int, num_logical_pages: int, num_slots: int, device: torch.device | str = "cpu",
                 window: int | None = None, backend: str = "auto"):
        for name, value in (("num_layers", num_layers), ("num_logical_pages", num_logical_pages), ("num_slots", num_slots)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"window must be None (every slot) or an integer >= 1, got {window!r}")
        self.num_layers = num_layers
        self.num_logical_pages = num_logical_pages
        self.num_slots = num_slots
        self.window = num_slots if window is None else min(window, num_slots)
        self.device = torch.empty(0, device=device).device  # normalized, e.g. "cuda" -> cuda:0
        # Internal layout: every index is shifted so that a padding id lands on a "trash" entry, never read as data,
        # and writes need no boolean-mask indexing (which would synchronize with the host):
        #   _resident[layer * (P + 1) + page + 1]: slot of the key; column 0 of each layer is trash, always -1;
        #   _owner[slot + 1]: the key's _resident index, 0 when free; _owner[0] is trash, always 0;
        #   _last_use[slot + 1]: stamp; _last_use[0] is trash (written, never read);
        #   _ring[i] and _ring[i + num_slots]: slot + 1 at ring position i (doubled: a window never wraps).
        self._p1 = num_logical_pages + 1
        self._resident = torch.full((num_layers * self._p1,), -1, dtype=torch.int32, device=self.device)
        self._owner = torch.zeros(num_slots + 1, dtype=torch.int64, device=self.device)
        self._last_use = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=self.device)
        self._ring = torch.empty(2 * num_slots, dtype=torch.int64, device=self.device)
        self._cursor = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._window_pos = torch.arange(self.window, dtype=torch.int64, device=self.device)
        # hits, misses, evictions, unplaced (deferred CacheCapacityError), bad ids (deferred ValueError)
        self._counts = torch.zeros(6, dtype=torch.int64, device=self.device)
        self.hits, self.misses, self.evictions, self.loads = (self._counts[i] for i in range(4))
        self._errors = LaggedRead(self.device, 2)  # unplaced, bad: `begin_step`'s snapshots, raised by a later one
        self._stamp = torch.zeros((), dtype=torch.int64, device=self.device)
        self._scope_ids = 0  # ids passed to `resolve` in the current scope: bounds the slots it protects
        self.backend = resolve_backend(backend, self._owner)
        self._triton = None
        if self.backend == "triton":
            from sparseserve_vllm.kernels.page_cache_resolve import FIRST_HIT_CLEAR, ResolveState

            first_hit = torch.full((num_slots + 1,), FIRST_HIT_CLEAR, dtype=torch.int32, device=self.device)
            self._triton = ResolveState(self._resident, self._owner, self._last_use, self._ring, self._cursor,
                                        self._stamp, self._counts, first_hit, num_logical_pages, num_slots)
        self._sort_ring()

    # ----------------------------------------------------------------------------------------------------- state
    @property
    def resident(self) -> torch.Tensor:
        """int32 [num_layers, num_logical_pages]: slot of each key, -1 when not cached (a view; do not write)."""
        return self._resident.view(self.num_layers, self._p1)[:, 1:]

    @property
    def owner(self) -> torch.Tensor:
        """int64 [num_slots]: `layer * num_logical_pages + page` held by each slot, -1 when free (a new tensor)."""
        idx = self._owner[1:]
        return torch.where(idx > 0, idx - idx // self._p1 - 1, -1)

    @property
    def last_use(self) -> torch.Tensor:
        """int64 [num_slots]: stamp of each slot's last use, -1 when free (a view)."""
        return self._last_use[1:]

    @property
    def stamp(self) -> int:
        """The current scope's stamp (synchronizes)."""
        return int(self._stamp.item())

    @property
    def num_used_slots(self) -> int:
        return int((self._owner[1:] > 0).sum().item())

    @property
    def num_free_slots(self) -> int:
        return self.num_slots - self.num_used_slots

    def stats(self) -> dict[str, int]:
        """Counters and occupancy as Python ints (synchronizes with the host)."""
        hits, misses, evictions, loads, used, stamp = torch.cat([
            self._counts[:4], (self._owner[1:] > 0).sum().view(1), self._stamp.view(1)]).tolist()
        return {
            "hits": hits,
            "misses": misses,
            "evictions": evictions,
            "loads": loads,
            "used_slots": used,
            "free_slots": self.num_slots - used,
            "num_slots": self.num_slots,
            "stamp": stamp,
        }

    # ------------------------------------------------------------------------------------------------ operations
    def check(self) -> None:
        """Raise every error `resolve` deferred and no `begin_step` raised yet (one host sync), clearing them."""
        unplaced, bad = self._counts[4:].tolist()
        self._counts[4:].zero_()
        for _, (u, b) in self._errors.take():
            unplaced, bad = unplaced + u, bad + b
        self._raise(unplaced, bad)

    def begin_step(self) -> None:
        """Start an engine step without a host sync: snapshot the deferred errors and raise those of the previous
        snapshot (see the module docstring), then a new scope and the eviction ring recomputed."""
        taken = self._errors.swap(self._counts[4:])
        self._counts[4:].zero_()  # after the copy, in stream order
        self._raise(sum(v[0] for _, v in taken), sum(v[1] for _, v in taken))
        self._stamp.add_(1)
        self._scope_ids = 0
        self._sort_ring()

    def _raise(self, unplaced: int, bad: int) -> None:
        if bad:
            raise ValueError(
                f"pages must be logical flat page ids in [0, {self.num_logical_pages}) or -1 (padding); {bad} id(s) "
                f"outside that range were passed to resolve (read as padding; deferred, see PageCache)"
                + (f"; also {unplaced} missing page(s) got no slot" if unplaced else "")
            )
        if unplaced:
            raise CacheCapacityError(
                f"page cache: {unplaced} missing page(s) got no slot (deferred, see PageCache): of the {self.window} "
                f"slots a resolve may scan (num_slots {self.num_slots}), too few were not protected by their scope; "
                f"enlarge the cache or admit fewer requests"
            )

    def counter_tensor(self) -> torch.Tensor:
        """int64 [5] on `device`: hits, misses, evictions, loads, used slots (no sync)."""
        return torch.cat([self._counts[:4], (self._owner[1:] > 0).sum().view(1)])

    def begin_layer(self) -> None:
        """Start a new protection scope inside the step (slots of earlier scopes become takeable); on the device."""
        self._stamp.add_(1)
        self._scope_ids = 0

    def reset(self) -> None:
        self._resident.fill_(-1)
        self._owner.zero_()
        self._last_use.fill_(-1)
        self._counts.zero_()
        self._errors.take()
        self._stamp.zero_()
        self._scope_ids = 0
        self._sort_ring()

    def lookup(self, layer: int, pages: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
        """int32 slots of `pages` in `layer` (-1 when not cached or for -1 padding); touches nothing.
        `check_range=False`: no range check and no host sync (ids outside `[-1, num_logical_pages)` read garbage)."""
        self._check_layer(layer)
        pages = self._check_pages(pages)
        if check_range:
            self._check_range(pages)
        return self._resident[pages + (layer * self._p1 + 1)]

    def invalidate(self, layer: int | None, pages: torch.Tensor) -> None:
        """Drop the keys `(layer, p)` for `p` in `pages` (every layer when `layer` is None) and free their slots.

        -1 entries and pages that are not cached are ignored. The eviction ring is recomputed (cursor 0).
        """
        if layer is not None:
            self._check_layer(layer)
        pages = self._check_pages(pages)
        if pages.numel() == 0:
            return
        self._check_range(pages)
        layers = torch.arange(self.num_layers, device=self.device) if layer is None else torch.tensor([layer], device=self.device)
        keys = (layers[:, None] * self._p1 + 1 + pages[None, :]).reshape(-1)  # padding -> the layer's trash column
        slots1 = self._resident[keys].to(torch.int64) + 1  # not cached -> trash slot 0
        self._owner[slots1] = 0
        self._last_use[slots1] = -1
        self._resident[keys] = -1
        self._sort_ring()

    def resolve(self, layer: int, pages: torch.Tensor, fresh: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Map `pages` of `layer` to cache slots, assigning slots to the misses (see the module docstring)."""
        self._check_layer(layer)
        pages = self._check_pages(pages, kernel_dtypes=self._triton is not None)
        n = pages.numel()
        if fresh is not None and (not isinstance(fresh, torch.Tensor) or fresh.dtype != torch.bool
                                  or fresh.shape != pages.shape or fresh.device != self.device):
            raise ValueError(f"fresh must be None or a bool tensor shaped like pages {tuple(pages.shape)} on "
                             f"{self.device}, got {fresh!r:.80}")
        if n == 0:
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            return empty.to(torch.int32), empty, empty.to(torch.int32)
        base = layer * self._p1 + 1  # _resident index of (layer, page 0)
        # Window of the eviction ring from the cursor, scanned as far as this scope's ids can protect slots (see the
        # module docstring).
        self._scope_ids += n
        w = min(self.window, self._scope_ids)
        if self._triton is not None:
            from sparseserve_vllm.kernels.page_cache_resolve import resolve_triton

            fresh = None if fresh is None else fresh.contiguous()  # the kernels read memory, not views
            return resolve_triton(self._triton, base, pages.contiguous(), fresh, w)
        return self._resolve_torch(base, pages, fresh, w)

    def _resolve_torch(self, base: int, pages: torch.Tensor, fresh: torch.Tensor | None, w: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = pages.numel()
        ok = (pages >= -1) & (pages < self.num_logical_pages)
        pages = torch.where(ok, pages, -1)
        # Priority of an entry within its page: its position, less n when fresh (the representative has the lowest).
        prio = torch.arange(n, device=self.device)
        if fresh is not None:
            prio = prio - n * fresh
        span = 2 * n
        srt_key = torch.sort(pages * span + prio + n).values  # padding first, then by page, then by priority
        srt = torch.div(srt_key, span, rounding_mode="floor")
        srt_prio = srt_key - srt * span - n
        rep_pos = srt_prio + n * (srt_prio < 0)  # the entry's position in `pages`
        first = srt != F.pad(srt[:-1], (1, 0), value=-1)  # the representative of each distinct page (never padding)
        keys = srt + base
        cached = self._resident[keys]
        # index_put_, not index_fill_: index_fill_ reads a tensor fill value on the host (a sync).
        self._last_use.index_put_((cached.to(torch.int64) + 1,), self._stamp)  # hits touched; others -> trash
        miss = first & (cached < 0)
        # k-th missing page (1-based) in the order of its representative's position, at that representative.
        at_pos = torch.zeros(n + 1, dtype=torch.int64, device=self.device)
        at_pos.index_put_((torch.where(miss, rep_pos, n),), torch.ones_like(rep_pos))
        rank_at_pos = torch.cumsum(at_pos[:n], 0)
        miss_rank = torch.where(miss, rank_at_pos[rep_pos.clamp_max(n - 1)], 0)
        num_miss = rank_at_pos[-1:]
        cand = self._ring[self._cursor + self._window_pos[:w]]  # slot + 1
        take_rank = torch.cumsum(self._last_use[cand] < self._stamp, 0)  # takeable slots ranked in window order
        num_takeable = take_rank[-1:]
        pos = torch.searchsorted(take_rank, miss_rank)  # window position of the miss_rank-th takeable slot
        placed = miss & (miss_rank <= num_takeable)
        victim = torch.where(placed, cand[pos.clamp_max(w - 1)], 0)  # slot + 1; 0 (trash) if none
        old = self._owner[victim]
        self._resident.index_fill_(0, old, -1)  # evicted keys (a free slot's owner 0 is trash)
        new_keys = torch.where(placed, keys, 0)
        self._owner.index_put_((victim,), new_keys)  # unplaced entries write 0 into the trash owner
        self._last_use.index_put_((victim,), self._stamp)
        victim_slot = (victim - 1).to(torch.int32)
        self._resident.index_put_((new_keys,), victim_slot)  # unplaced entries write -1 into the trash column
        num_placed = torch.minimum(num_miss, num_takeable)
        self._cursor.add_(torch.searchsorted(take_rank, num_placed) + (num_placed > 0)).remainder_(self.num_slots)
        to_load = torch.where(srt_prio < 0, -1, srt)  # a fresh representative: nothing to load
        self._counts.add_(torch.cat([
            first.sum().view(1) - num_miss, num_miss, (old > 0).sum().view(1), (placed & (to_load >= 0)).sum().view(1),
            num_miss - num_placed, n - ok.sum().view(1),
        ]))
        out_idx = torch.where(placed, miss_rank - 1, n)  # compacted; entry n is trash, cut off
        miss_pages = torch.full((n + 1,), -1, dtype=torch.int64, device=self.device).index_put_((out_idx,), to_load)
        miss_slots = torch.full((n + 1,), -1, dtype=torch.int32, device=self.device).index_put_((out_idx,), victim_slot)
        return self._resident[pages + base], miss_pages[:n], miss_slots[:n]

    # ------------------------------------------------------------------------------------------------- helpers
    def _sort_ring(self) -> None:
        """Eviction ring: slots by ascending (last_use, slot id) (a stable sort of slot-ordered stamps); cursor 0."""
        order = torch.sort(self._last_use[1:], stable=True).indices + 1
        self._ring[: self.num_slots] = order
        self._ring[self.num_slots:] = order
        self._cursor.zero_()

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def _check_pages(self, pages: torch.Tensor, *, kernel_dtypes: bool = False) -> torch.Tensor:
        """`pages` validated, as int64 (`kernel_dtypes`: int32 stays int32, which the Triton kernels read as it is)."""
        if not isinstance(pages, torch.Tensor) or pages.dim() != 1:
            raise ValueError(f"pages must be a 1-D integer tensor, got {pages!r:.80}")
        if pages.dtype.is_floating_point or pages.dtype.is_complex or pages.dtype == torch.bool:
            raise ValueError(f"pages must have an integer dtype, got {pages.dtype}")
        if pages.device != self.device:
            raise ValueError(f"pages must be on the cache's device {self.device}, got {pages.device}")
        return pages if kernel_dtypes and pages.dtype == torch.int32 else pages.to(torch.int64)

    def _check_range(self, pages: torch.Tensor) -> None:
        """Synchronizes: used by `lookup` and `invalidate` only."""
        if pages.numel() == 0:
            return
        lo, hi = torch.stack([pages.min(), pages.max()]).tolist()
        if lo < -1 or hi >= self.num_logical_pages:
            raise ValueError(
                f"pages must be logical flat page ids in [0, {self.num_logical_pages}) or -1 (padding); "
                f"got values in [{lo}, {hi}]"
            )
