"""`resolve_triton`: `PageCache.resolve` in one Triton launch (up to 1024 ids) or five, without a host sync
(CUDA-graph capturable).

Contract: `resolve_triton(state, base, pages, fresh, window_len)` has exactly the effect and outputs of the torch
path of `core/page_cache.py` (its module docstring states the semantics; the tests hold both against one plain
reference model). `state` is the cache's `ResolveState` (its tensors, all on one device: `resident` int32, `owner`,
`last_use`, `ring`, `cursor` [1], `stamp` [], `counts` [6] int64 (hits, misses, evictions, loads, unplaced, bad),
`first_hit` int32 [num_slots + 1] holding `FIRST_HIT_CLEAR` everywhere between calls); `base` is the `resident`
index of `(layer, page 0)`; `pages` a 1-D int32 or int64 tensor of N ids; `fresh` None or a 1-D bool tensor of N;
`window_len` the ring positions to scan. It returns `(slots int32 [N], miss_pages int64 [N], miss_slots int32 [N])`.

The launches (N ids, W = window_len ring positions):
  1. claim   (N): hits get the stamp and compete for "first copy" of their slot (`atomic_min` of the entry's index
                  in `first_hit`); each entry of a missing page writes `atomic_min(resident[key], claim)`, with
                  `claim = i - N - 2` (`- N` more for a fresh entry), all below -1: the page's representative is
                  its first fresh entry if any, else its first entry;
  2. flags   (N): an entry is the representative of its missing page when `resident[key]` equals its claim; hits'
                  first copies are counted;
  3. scan    (2 programs): the representatives' 1-based ranks in entry order, and the window's takeable ring
                  positions (`last_use < stamp`) compacted in window order, with both totals;
  4. assign  (N): the k-th representative takes the k-th takeable slot (evicting its key), or, past the takeable
                  slots, drops its claim (unplaced); `miss_pages`/`miss_slots` written in rank order, -1 after;
  5. finish  (N): every entry's slot read back, `first_hit` cleared, counters and the cursor advanced.
Up to 1024 ids, as at small batch (a request's selection is `Hkv x budget / page_size` ids, a step's new tokens
`Hkv` per request), one program (of 32 to 1024 lanes: `FUSED_LAUNCH`) runs the five phases in order, with a
block-wide barrier between phases and the cache state loaded `volatile` (past L1, so what a phase wrote, atomics
included, is what the next one reads): one launch instead of five, the same effect. Its window scan and rank scan
run one after the other.
Entries are int64 ids; ids outside `[-1, num_pages)` count as bad and act as padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["FIRST_HIT_CLEAR", "ResolveState", "resolve_triton"]

FIRST_HIT_CLEAR = torch.iinfo(torch.int32).max
_BLOCK = 1024  # ids per program of the five launches
# The fused kernel's (block, warps) tiers, ascending: a call of n ids runs fused in the first block >= n (fewer
# warps make its phase barriers and reductions cheaper), or in five launches past the last. Timed by
# benchmarks/bench_resolve.py.
FUSED_LAUNCH = ((32, 1), (256, 8), (512, 8), (1024, 8))


@dataclass
class ResolveState:
    resident: torch.Tensor
    owner: torch.Tensor
    last_use: torch.Tensor
    ring: torch.Tensor
    cursor: torch.Tensor
    stamp: torch.Tensor
    counts: torch.Tensor
    first_hit: torch.Tensor
    num_pages: int
    num_slots: int


@triton.jit
def _entry(pages_ptr, fresh_ptr, offs, n, base, num_pages, HAS_FRESH: tl.constexpr):
    """Per entry: in range of the call, bad id, real page, its resident index, fresh, claim value."""
    m = offs < n
    p = tl.load(pages_ptr + offs, mask=m, other=-1).to(tl.int64)
    ok = (p >= -1) & (p < num_pages)
    real = m & ok & (p >= 0)
    key = base + p
    if HAS_FRESH:
        fresh = tl.load(fresh_ptr + offs, mask=m, other=0) != 0
    else:
        fresh = offs < 0
    claim = (offs - n - 2 - tl.where(fresh, n, 0)).to(tl.int32)
    return m, ok, real, p, key, fresh, claim


# The phases below load the cache state `volatile` (past L1): in the fused kernel one program writes it (atomics
# included) in one phase and reads it in the next, after a barrier.

@triton.jit
def _claim(offs, pages_ptr, fresh_ptr, n, base, num_pages, resident_ptr, last_use_ptr, first_hit_ptr, stamp_ptr,
           counts_ptr, HAS_FRESH: tl.constexpr):
    m, ok, real, p, key, fresh, claim = _entry(pages_ptr, fresh_ptr, offs, n, base, num_pages, HAS_FRESH)
    tl.atomic_add(counts_ptr + 5, tl.sum((m & ~ok).to(tl.int64), 0))
    cached = tl.load(resident_ptr + key, mask=real, other=-1, volatile=True).to(tl.int64)
    hit = real & (cached >= 0)
    stamp = tl.load(stamp_ptr)
    tl.store(last_use_ptr + cached + 1, tl.zeros_like(cached) + stamp, mask=hit)
    tl.atomic_min(first_hit_ptr + cached + 1, offs, mask=hit)
    tl.atomic_min(resident_ptr + key, claim, mask=real & (cached < 0))


@triton.jit
def _flags(offs, pages_ptr, fresh_ptr, n, base, num_pages, resident_ptr, first_hit_ptr, flag_ptr, counts_ptr,
           HAS_FRESH: tl.constexpr):
    m, ok, real, p, key, fresh, claim = _entry(pages_ptr, fresh_ptr, offs, n, base, num_pages, HAS_FRESH)
    r = tl.load(resident_ptr + key, mask=real, other=-1, volatile=True)
    rep = real & (r == claim)
    tl.store(flag_ptr + offs, tl.where(rep, tl.where(fresh, 2, 1), 0), mask=m)
    hit = real & (r >= 0)
    first = tl.load(first_hit_ptr + r.to(tl.int64) + 1, mask=hit, other=-1, volatile=True)
    tl.atomic_add(counts_ptr + 0, tl.sum((hit & (first == offs)).to(tl.int64), 0))


@triton.jit
def _rank_scan(flag_ptr, rank_ptr, n, totals_ptr, BLOCK: tl.constexpr):
    """The representatives' 1-based ranks in entry order, and their number."""
    carry = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), 0)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        f = (tl.load(flag_ptr + offs, mask=m, other=0, volatile=True) > 0).to(tl.int32)
        tl.store(rank_ptr + offs, tl.cumsum(f, 0) + carry, mask=m)
        carry += tl.sum(f, 0)
    tl.store(totals_ptr, carry)


@triton.jit
def _window_scan(ring_ptr, cursor_ptr, last_use_ptr, stamp_ptr, take_pos_ptr, w, totals_ptr, BLOCK: tl.constexpr):
    """The window's takeable ring positions (`last_use < stamp`) compacted in window order, and their number."""
    carry = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), 0)
    cursor = tl.load(cursor_ptr)
    stamp = tl.load(stamp_ptr)
    for start in range(0, w, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < w
        cand = tl.load(ring_ptr + cursor + offs, mask=m, other=0)
        take = m & (tl.load(last_use_ptr + cand, mask=m, other=0, volatile=True) < stamp)
        t = take.to(tl.int32)
        rank = tl.cumsum(t, 0) + carry
        tl.store(take_pos_ptr + rank - 1, offs, mask=take)
        carry += tl.sum(t, 0)
    tl.store(totals_ptr + 1, carry)


@triton.jit
def _assign(offs, pages_ptr, n, base, flag_ptr, rank_ptr, totals_ptr, take_pos_ptr, ring_ptr, cursor_ptr, owner_ptr,
            last_use_ptr, resident_ptr, stamp_ptr, counts_ptr, miss_pages_ptr, miss_slots_ptr, BLOCK: tl.constexpr):
    m = offs < n
    flag = tl.load(flag_ptr + offs, mask=m, other=0, volatile=True)
    rank = tl.load(rank_ptr + offs, mask=m, other=0, volatile=True)
    num_take = tl.load(totals_ptr + 1, volatile=True)
    num_placed = tl.minimum(tl.load(totals_ptr, volatile=True), num_take)
    rep = m & (flag > 0)
    placed = rep & (rank <= num_take)
    p = tl.load(pages_ptr + offs, mask=rep, other=-1).to(tl.int64)
    key = base + p
    j = tl.load(take_pos_ptr + rank - 1, mask=placed, other=0, volatile=True)
    victim = tl.load(ring_ptr + tl.load(cursor_ptr) + j, mask=placed, other=0)  # slot + 1
    old = tl.load(owner_ptr + victim, mask=placed, other=0, volatile=True)
    evict = placed & (old > 0)
    tl.store(resident_ptr + old, tl.full((BLOCK,), -1, tl.int32), mask=evict)
    tl.atomic_add(counts_ptr + 2, tl.sum(evict.to(tl.int64), 0))
    tl.atomic_add(counts_ptr + 3, tl.sum((placed & (flag == 1)).to(tl.int64), 0))
    tl.store(owner_ptr + victim, key, mask=placed)
    tl.store(last_use_ptr + victim, tl.zeros_like(victim) + tl.load(stamp_ptr), mask=placed)
    slot = (victim - 1).to(tl.int32)
    tl.store(resident_ptr + key, tl.where(placed, slot, -1), mask=rep)  # unplaced: the claim is dropped
    tl.store(miss_pages_ptr + rank - 1, tl.where(flag == 2, -1, p), mask=placed)
    tl.store(miss_slots_ptr + rank - 1, slot, mask=placed)
    tail = m & (offs >= num_placed)
    tl.store(miss_pages_ptr + offs, tl.full((BLOCK,), -1, tl.int64), mask=tail)
    tl.store(miss_slots_ptr + offs, tl.full((BLOCK,), -1, tl.int32), mask=tail)


@triton.jit
def _finish(offs, lead, pages_ptr, n, base, num_pages, resident_ptr, first_hit_ptr, slots_ptr, totals_ptr,
            take_pos_ptr, cursor_ptr, counts_ptr, num_slots, FIRST_HIT_CLEAR: tl.constexpr, BLOCK: tl.constexpr):
    m, ok, real, p, key, fresh, claim = _entry(pages_ptr, pages_ptr, offs, n, base, num_pages, False)
    s = tl.load(resident_ptr + key, mask=real, other=-1, volatile=True)
    tl.store(slots_ptr + offs, s, mask=m)
    tl.store(first_hit_ptr + s.to(tl.int64) + 1, tl.full((BLOCK,), FIRST_HIT_CLEAR, tl.int32), mask=real & (s >= 0))
    if lead:
        num_miss = tl.load(totals_ptr, volatile=True)
        num_placed = tl.minimum(num_miss, tl.load(totals_ptr + 1, volatile=True))
        tl.atomic_add(counts_ptr + 1, num_miss.to(tl.int64))
        tl.atomic_add(counts_ptr + 4, (num_miss - num_placed).to(tl.int64))
        last = tl.load(take_pos_ptr + num_placed - 1, mask=num_placed > 0, other=-1, volatile=True)
        cursor = tl.load(cursor_ptr)
        tl.store(cursor_ptr, (cursor + last + 1) % num_slots, mask=num_placed > 0)


@triton.jit
def _claim_kernel(pages_ptr, fresh_ptr, n, base, num_pages, resident_ptr, last_use_ptr, first_hit_ptr, stamp_ptr,
                  counts_ptr, HAS_FRESH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _claim(offs, pages_ptr, fresh_ptr, n, base, num_pages, resident_ptr, last_use_ptr, first_hit_ptr, stamp_ptr,
           counts_ptr, HAS_FRESH)


@triton.jit
def _flags_kernel(pages_ptr, fresh_ptr, n, base, num_pages, resident_ptr, first_hit_ptr, flag_ptr, counts_ptr,
                  HAS_FRESH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _flags(offs, pages_ptr, fresh_ptr, n, base, num_pages, resident_ptr, first_hit_ptr, flag_ptr, counts_ptr,
           HAS_FRESH)


@triton.jit
def _scan_kernel(flag_ptr, rank_ptr, n, ring_ptr, cursor_ptr, last_use_ptr, stamp_ptr, take_pos_ptr, w, totals_ptr,
                 BLOCK: tl.constexpr):
    """Program 0: ranks of the representatives; program 1: the window's takeable positions, compacted."""
    if tl.program_id(0) == 0:
        _rank_scan(flag_ptr, rank_ptr, n, totals_ptr, BLOCK)
    else:
        _window_scan(ring_ptr, cursor_ptr, last_use_ptr, stamp_ptr, take_pos_ptr, w, totals_ptr, BLOCK)


@triton.jit
def _assign_kernel(pages_ptr, n, base, flag_ptr, rank_ptr, totals_ptr, take_pos_ptr, ring_ptr, cursor_ptr,
                   owner_ptr, last_use_ptr, resident_ptr, stamp_ptr, counts_ptr, miss_pages_ptr, miss_slots_ptr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _assign(offs, pages_ptr, n, base, flag_ptr, rank_ptr, totals_ptr, take_pos_ptr, ring_ptr, cursor_ptr, owner_ptr,
            last_use_ptr, resident_ptr, stamp_ptr, counts_ptr, miss_pages_ptr, miss_slots_ptr, BLOCK)


@triton.jit
def _finish_kernel(pages_ptr, n, base, num_pages, resident_ptr, first_hit_ptr, slots_ptr, totals_ptr, take_pos_ptr,
                   cursor_ptr, counts_ptr, num_slots, FIRST_HIT_CLEAR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _finish(offs, tl.program_id(0) == 0, pages_ptr, n, base, num_pages, resident_ptr, first_hit_ptr, slots_ptr,
            totals_ptr, take_pos_ptr, cursor_ptr, counts_ptr, num_slots, FIRST_HIT_CLEAR, BLOCK)


@triton.jit
def _fused_kernel(pages_ptr, fresh_ptr, n, base, num_pages, resident_ptr, owner_ptr, last_use_ptr, ring_ptr,
                  cursor_ptr, stamp_ptr, counts_ptr, first_hit_ptr, flag_ptr, rank_ptr, take_pos_ptr, w, totals_ptr,
                  slots_ptr, miss_pages_ptr, miss_slots_ptr, num_slots, HAS_FRESH: tl.constexpr,
                  FIRST_HIT_CLEAR: tl.constexpr, BLOCK: tl.constexpr):
    """All five phases in one program (n <= BLOCK), a barrier between phases."""
    offs = tl.arange(0, BLOCK)
    _claim(offs, pages_ptr, fresh_ptr, n, base, num_pages, resident_ptr, last_use_ptr, first_hit_ptr, stamp_ptr,
           counts_ptr, HAS_FRESH)
    tl.debug_barrier()
    _flags(offs, pages_ptr, fresh_ptr, n, base, num_pages, resident_ptr, first_hit_ptr, flag_ptr, counts_ptr,
           HAS_FRESH)
    tl.debug_barrier()
    _rank_scan(flag_ptr, rank_ptr, n, totals_ptr, BLOCK)
    _window_scan(ring_ptr, cursor_ptr, last_use_ptr, stamp_ptr, take_pos_ptr, w, totals_ptr, BLOCK)
    tl.debug_barrier()
    _assign(offs, pages_ptr, n, base, flag_ptr, rank_ptr, totals_ptr, take_pos_ptr, ring_ptr, cursor_ptr, owner_ptr,
            last_use_ptr, resident_ptr, stamp_ptr, counts_ptr, miss_pages_ptr, miss_slots_ptr, BLOCK)
    tl.debug_barrier()
    _finish(offs, True, pages_ptr, n, base, num_pages, resident_ptr, first_hit_ptr, slots_ptr, totals_ptr,
            take_pos_ptr, cursor_ptr, counts_ptr, num_slots, FIRST_HIT_CLEAR, BLOCK)


def resolve_triton(state: ResolveState, base: int, pages: torch.Tensor, fresh: torch.Tensor | None,
                   window_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See the module docstring. `pages` int32/int64 [N >= 1], `fresh` None or bool [N], all on the state's device."""
    n, dev = pages.numel(), pages.device
    flag = torch.empty(n, dtype=torch.int32, device=dev)
    rank = torch.empty(n, dtype=torch.int32, device=dev)
    take_pos = torch.empty(window_len, dtype=torch.int32, device=dev)
    totals = torch.empty(2, dtype=torch.int32, device=dev)
    slots = torch.empty(n, dtype=torch.int32, device=dev)
    miss_pages = torch.empty(n, dtype=torch.int64, device=dev)
    miss_slots = torch.empty(n, dtype=torch.int32, device=dev)
    has_fresh = fresh is not None
    fresh_arg = fresh if has_fresh else pages
    s = state
    tier = next(((b, w) for b, w in FUSED_LAUNCH if n <= b), None)
    if tier is not None:
        block, warps = tier
        _fused_kernel[(1,)](pages, fresh_arg, n, base, s.num_pages, s.resident, s.owner, s.last_use, s.ring,
                            s.cursor, s.stamp, s.counts, s.first_hit, flag, rank, take_pos, window_len, totals,
                            slots, miss_pages, miss_slots, s.num_slots, HAS_FRESH=has_fresh,
                            FIRST_HIT_CLEAR=FIRST_HIT_CLEAR, BLOCK=block, num_warps=warps)
        return slots, miss_pages, miss_slots
    grid = (triton.cdiv(n, _BLOCK),)
    _claim_kernel[grid](pages, fresh_arg, n, base, s.num_pages, s.resident, s.last_use, s.first_hit, s.stamp,
                        s.counts, HAS_FRESH=has_fresh, BLOCK=_BLOCK)
    _flags_kernel[grid](pages, fresh_arg, n, base, s.num_pages, s.resident, s.first_hit, flag, s.counts,
                        HAS_FRESH=has_fresh, BLOCK=_BLOCK)
    _scan_kernel[(2,)](flag, rank, n, s.ring, s.cursor, s.last_use, s.stamp, take_pos, window_len, totals,
                       BLOCK=_BLOCK)
    _assign_kernel[grid](pages, n, base, flag, rank, totals, take_pos, s.ring, s.cursor, s.owner, s.last_use,
                         s.resident, s.stamp, s.counts, miss_pages, miss_slots, BLOCK=_BLOCK)
    _finish_kernel[grid](pages, n, base, s.num_pages, s.resident, s.first_hit, slots, totals, take_pos, s.cursor,
                         s.counts, s.num_slots, FIRST_HIT_CLEAR=FIRST_HIT_CLEAR, BLOCK=_BLOCK)
    return slots, miss_pages, miss_slots
