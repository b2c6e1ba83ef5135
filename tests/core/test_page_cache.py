"""`PageCache` against a plain-Python reference model with the same documented semantics.

Reference semantics (the module docstring of `page_cache`): `begin_step` snapshots the deferred error counts and
raises those of the previous snapshot (one step late), then opens a new scope and sorts all slots by (last use, slot
id) into the eviction ring (cursor 0); `begin_layer` only opens a new scope. `resolve` reads bad ids as padding, touches hits with the stamp, then gives the distinct misses, ascending,
the takeable slots (last use older than the stamp) of the window of `W` ring positions from the cursor, in window
order; misses beyond them stay unplaced; the cursor moves just past the last slot taken. `check` raises every count
not raised yet, the pending snapshot's included: `ValueError` for bad ids, else `CacheCapacityError` for unplaced
misses.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sparseserve_vllm.core.page_cache import CacheCapacityError, PageCache
from sparseserve_vllm.kernels import page_cache_resolve
from tests.host_sync import allow_lagged_reads, forbid_host_sync

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the Triton backend can run on CPU tensors


class RefCache:
    """dicts, lists and a ring list: the obvious Python implementation of the documented semantics."""

    def __init__(self, num_layers: int, num_pages: int, num_slots: int, window: int | None = None):
        self.num_layers, self.num_pages, self.num_slots = num_layers, num_pages, num_slots
        self.window = num_slots if window is None else min(window, num_slots)
        self.reset()

    def reset(self) -> None:
        self.slot_of: dict[tuple[int, int], int] = {}
        self.key_of: list[tuple[int, int] | None] = [None] * self.num_slots
        self.last: list[int] = [-1] * self.num_slots
        self.stamp = 0
        self.hits = self.misses = self.evictions = self.loads = self.unplaced = self.bad = 0
        self.snapshot = (0, 0)  # (unplaced, bad) snapshotted by the last begin_step, raised by the next one
        self.sort_ring()

    def sort_ring(self) -> None:
        self.ring = sorted(range(self.num_slots), key=lambda s: (self.last[s], s))
        self.cursor = 0

    @staticmethod
    def raise_errors(unplaced: int, bad: int) -> None:
        if bad:
            raise ValueError(f"{bad} bad")
        if unplaced:
            raise CacheCapacityError(f"{unplaced} unplaced")

    def check(self) -> None:
        unplaced, bad = self.unplaced + self.snapshot[0], self.bad + self.snapshot[1]
        self.unplaced = self.bad = 0
        self.snapshot = (0, 0)
        self.raise_errors(unplaced, bad)

    def begin_step(self) -> None:
        snapshot, self.snapshot = self.snapshot, (self.unplaced, self.bad)
        self.unplaced = self.bad = 0
        self.raise_errors(*snapshot)
        self.stamp += 1
        self.sort_ring()

    def begin_layer(self) -> None:
        self.stamp += 1

    def resolve(self, layer: int, pages: list[int], fresh: list[bool] | None = None):
        n = len(pages)
        fresh = fresh or [False] * n
        good = [p if -1 <= p < self.num_pages else -1 for p in pages]
        self.bad += sum(p != q for p, q in zip(pages, good))
        rep: dict[int, tuple[int, bool]] = {}  # page -> (position, fresh) of its first fresh entry, else first entry
        for i, p in enumerate(good):
            if p != -1 and (p not in rep or (fresh[i] and not rep[p][1])):
                rep[p] = (i, fresh[i])
        distinct = sorted(rep, key=lambda p: rep[p][0])
        for p in distinct:
            if (layer, p) in self.slot_of:
                self.last[self.slot_of[(layer, p)]] = self.stamp
        misses = [p for p in distinct if (layer, p) not in self.slot_of]
        window = [self.ring[(self.cursor + i) % self.num_slots] for i in range(self.window)]
        takeable = [i for i, s in enumerate(window) if self.last[s] < self.stamp]
        placed = min(len(misses), len(takeable))
        victims = [window[i] for i in takeable[:placed]]
        for p, s in zip(misses, victims):
            if self.key_of[s] is not None:
                del self.slot_of[self.key_of[s]]
                self.evictions += 1
            self.key_of[s] = (layer, p)
            self.slot_of[(layer, p)] = s
            self.last[s] = self.stamp
        if placed:
            self.cursor = (self.cursor + takeable[placed - 1] + 1) % self.num_slots
        self.hits += len(distinct) - len(misses)
        self.misses += len(misses)
        self.unplaced += len(misses) - placed
        slots = [self.slot_of.get((layer, p), -1) for p in good]
        pad = [-1] * (n - placed)
        loads = [-1 if rep[p][1] else p for p in misses[:placed]]
        self.loads += sum(p >= 0 for p in loads)
        return slots, loads + pad, victims + pad

    def lookup(self, layer: int, pages: list[int]) -> list[int]:
        return [self.slot_of.get((layer, p), -1) for p in pages]

    def invalidate(self, layer: int | None, pages: list[int]) -> None:
        layers = range(self.num_layers) if layer is None else [layer]
        for l in layers:
            for p in pages:
                s = self.slot_of.pop((l, p), None)
                if s is not None:
                    self.key_of[s] = None
                    self.last[s] = -1
        if pages:
            self.sort_ring()

    def resident(self) -> list[list[int]]:
        out = [[-1] * self.num_pages for _ in range(self.num_layers)]
        for (l, p), s in self.slot_of.items():
            out[l][p] = s
        return out


def _t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _assert_same_state(cache: PageCache, ref: RefCache) -> None:
    assert cache.resident.tolist() == ref.resident()
    owners = [-1 if k is None else k[0] * ref.num_pages + k[1] for k in ref.key_of]
    assert cache.owner.tolist() == owners
    assert cache.last_use.tolist() == ref.last
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"], stats["loads"]) == (
        ref.hits, ref.misses, ref.evictions, ref.loads)
    assert stats["used_slots"] == len(ref.slot_of) == cache.num_used_slots
    assert cache.num_free_slots == ref.num_slots - len(ref.slot_of)
    # No two keys share a slot, and resident/owner agree both ways.
    resident = cache.resident.reshape(-1)
    cached = resident[resident >= 0]
    assert cached.unique().numel() == cached.numel()
    for slot, key in enumerate(cache.owner.tolist()):
        if key >= 0:
            assert resident[key].item() == slot


def _check_both(cache: PageCache, ref: RefCache, call) -> None:
    """Run `call(x)` on both; they must raise the same deferred error class, or neither."""
    try:
        call(ref)
    except (ValueError, CacheCapacityError) as e:
        with pytest.raises(type(e), match="pages must be" if isinstance(e, ValueError) else "got no slot"):
            call(cache)
        event(type(e).__name__)
        return
    call(cache)


L, P, S = 2, 10, 5
page_lists = st.lists(st.integers(min_value=-1, max_value=P - 1), max_size=9)
bad_page_lists = st.lists(st.integers(min_value=-3, max_value=P + 2), max_size=4)


class PageCacheMachine(RuleBasedStateMachine):
    backend = "torch"

    @initialize(window=st.sampled_from([None, 2, 3, S + 2]))
    def setup(self, window):
        self.cache = PageCache(L, P, S, window=window, backend=self.backend)
        self.ref = RefCache(L, P, S, window=window)

    @rule()
    def begin_step(self):
        _check_both(self.cache, self.ref, lambda c: c.begin_step())

    @rule()
    def begin_layer(self):
        self.cache.begin_layer()
        self.ref.begin_layer()

    @rule()
    def check(self):
        _check_both(self.cache, self.ref, lambda c: c.check())

    @rule(layer=st.integers(0, L - 1), pages=page_lists | bad_page_lists, data=st.data())
    def resolve(self, layer, pages, data):
        fresh = data.draw(st.none() | st.lists(st.booleans(), min_size=len(pages), max_size=len(pages)))
        dtype = data.draw(st.sampled_from([torch.int64, torch.int32]))  # the selection's page ids are int32
        expected = self.ref.resolve(layer, pages, fresh)
        slots, miss_pages, miss_slots = self.cache.resolve(
            layer, _t(pages).to(dtype), None if fresh is None else torch.tensor(fresh, dtype=torch.bool))
        assert slots.dtype == torch.int32 and miss_slots.dtype == torch.int32 and miss_pages.dtype == torch.int64
        assert (slots.tolist(), miss_pages.tolist(), miss_slots.tolist()) == expected
        if self.ref.unplaced:
            event("unplaced pages")

    @rule(layer=st.integers(0, L - 1), pages=page_lists)
    def lookup(self, layer, pages):
        assert self.cache.lookup(layer, _t(pages)).tolist() == self.ref.lookup(layer, pages)

    @rule(layer=st.none() | st.integers(0, L - 1), pages=page_lists)
    def invalidate(self, layer, pages):
        self.cache.invalidate(layer, _t(pages))
        self.ref.invalidate(layer, pages)

    @precondition(lambda self: self.ref.stamp > 5)
    @rule()
    def reset(self):
        self.cache.reset()
        self.ref.reset()

    @invariant()
    def same_state(self):
        _assert_same_state(self.cache, self.ref)
        assert self.cache._cursor.item() == self.ref.cursor
        assert [s - 1 for s in self.cache._ring[: S].tolist()] == self.ref.ring


PageCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPageCacheMachine = PageCacheMachine.TestCase


class TritonPageCacheMachine(PageCacheMachine):
    """The Triton path with 4-id blocks: calls of up to 4 ids run the fused one-program kernel, longer ones the five
    launches over several blocks (chunked scans)."""
    backend = "triton"

    @initialize(window=st.sampled_from([None, 2, 3, S + 2]))
    def setup(self, window):
        self._launch = page_cache_resolve._BLOCK, page_cache_resolve.FUSED_LAUNCH
        page_cache_resolve._BLOCK, page_cache_resolve.FUSED_LAUNCH = 4, ((4, 1),)
        super().setup(window)

    def teardown(self):
        page_cache_resolve._BLOCK, page_cache_resolve.FUSED_LAUNCH = self._launch


TritonPageCacheMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestTritonPageCacheMachine = pytest.mark.skipif(not INTERPRET, reason="the Triton path on CPU tensors needs "
                                                "TRITON_INTERPRET=1 (on CUDA: test_cuda_matches_cpu_without_syncs)")(
    TritonPageCacheMachine.TestCase)

both_backends = pytest.mark.parametrize("backend", [
    "torch", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")),
])


@both_backends
def test_lru_order_scopes_and_deferred_capacity_error(backend):
    cache = PageCache(num_layers=2, num_logical_pages=16, num_slots=4, backend=backend)
    slots, miss_pages, miss_slots = cache.resolve(0, _t([7, 3, 3, -1, 5]))
    # Misses in order of first appearance take free slots lowest first; duplicates get the same slot; -1 padded.
    assert miss_pages.tolist() == [7, 3, 5, -1, -1] and miss_slots.tolist() == [0, 1, 2, -1, -1]
    assert slots.tolist() == [0, 1, 1, -1, 2]
    cache.begin_step()  # ring: free slot 3, then 0, 1, 2 (all used at stamp 0)
    cache.resolve(0, _t([5]))  # touch page 5 (slot 2) at stamp 1
    _, miss_pages, miss_slots = cache.resolve(1, _t([0, 1]))
    # Free slot 3 first, then the LRU slot 0 (page 7 evicted); slot 2 is protected in this scope.
    assert miss_pages.tolist() == [0, 1] and miss_slots.tolist() == [3, 0]
    assert cache.lookup(0, _t([3, 5, 7])).tolist() == [1, 2, -1]
    # Only slot 1 is takeable in this scope: page 8 gets it, page 9 stays unplaced; nothing raises yet.
    slots, miss_pages, miss_slots = cache.resolve(0, _t([8, 9, 5]))
    assert slots.tolist() == [1, -1, 2] and miss_pages.tolist() == [8, -1, -1] and miss_slots.tolist() == [1, -1, -1]
    assert cache.stats() == {
        "hits": 2, "misses": 7, "evictions": 2, "loads": 6, "used_slots": 4, "free_slots": 0, "num_slots": 4,
        "stamp": 1,
    }
    # A new scope inside the step makes the slots of earlier scopes takeable, from the cursor on (past slot 1).
    cache.begin_layer()
    _, miss_pages, miss_slots = cache.resolve(0, _t([9]))
    assert miss_pages.tolist() == [9] and miss_slots.tolist() == [2]  # ring 3, 0, 1, 2; cursor was at 2
    cache.begin_step()  # snapshots the unplaced page's count, without waiting for the device: nothing raises yet
    with pytest.raises(CacheCapacityError, match=r"1 missing page\(s\) got no slot .* enlarge the cache"):
        cache.begin_step()  # one step late
    cache.check()  # cleared once raised
    cache.begin_step()


@both_backends
def test_fresh_pages_rank_at_their_fresh_entry_and_load_nothing(backend):
    cache = PageCache(num_layers=1, num_logical_pages=16, num_slots=8, backend=backend)
    cache.resolve(0, _t([9]))  # slot 0
    fresh = torch.tensor([False, False, True, False, True, True])
    slots, miss_pages, miss_slots = cache.resolve(0, _t([4, 5, 4, 6, 9, -1]), fresh)
    # Representatives: 5 at 1, 4 at 2 (its fresh entry), 6 at 3; page 9 is a hit (fresh or not), -1 is padding.
    assert miss_slots.tolist() == [1, 2, 3, -1, -1, -1]
    assert miss_pages.tolist() == [5, -1, 6, -1, -1, -1]  # page 4 is fresh: its slot gets no load
    assert slots.tolist() == [2, 1, 2, 3, 0, -1]
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 4 and cache.stats()["loads"] == 3  # 9, 5, 6
    # A strided `fresh` (a stride-0 view, as a [1, heads] expand flattens; the True after it in memory is not in it)
    # is read by element, not by memory.
    _, miss_pages, _ = cache.resolve(0, _t([10, 11]), torch.tensor([False, True])[:1].expand(2))
    assert miss_pages.tolist() == [10, 11]


@both_backends
def test_bad_ids_are_padding_until_check_raises(backend):
    cache = PageCache(num_layers=1, num_logical_pages=8, num_slots=4, backend=backend)
    slots, miss_pages, _ = cache.resolve(0, _t([8, 2, -2]))
    assert slots.tolist() == [-1, 0, -1] and miss_pages.tolist() == [2, -1, -1]
    with pytest.raises(ValueError, match=r"\[0, 8\) .* 2 id\(s\)"):
        cache.check()
    cache.begin_step()  # cleared


@both_backends
def test_begin_step_raises_the_errors_one_step_late_without_a_host_sync(backend):
    """Errors of the resolves of step N are snapshotted by the start of step N + 1 and raised by the start of step
    N + 2; a raising start has snapshotted the next step's errors already. No step start reads device values."""
    cache = PageCache(num_layers=1, num_logical_pages=8, num_slots=2, backend=backend)
    cache.begin_step()
    with pytest.MonkeyPatch.context() as mp:
        forbid_host_sync(mp)
        allow_lagged_reads(mp)
        cache.resolve(0, _t([0, 1, 2]))  # step 1: 3 misses, 2 slots
        cache.begin_step()  # step 2 starts: step 1's count is snapshotted
        cache.resolve(0, _t([9, -1]))  # step 2: a bad id
        with pytest.raises(CacheCapacityError, match=r"1 missing page\(s\)"):
            cache.begin_step()  # step 3 would start: step 1's error
        with pytest.raises(ValueError, match=r"1 id\(s\) outside"):
            cache.begin_step()  # step 2's error, snapshotted by the start that raised
        cache.begin_step()
        cache.begin_step()  # nothing left
        with pytest.raises(AssertionError, match="sync-free path"):
            cache.check()  # the synchronous check reads the device: the guard catches it


@both_backends
def test_check_raises_what_begin_step_has_not_raised_yet(backend):
    cache = PageCache(num_layers=1, num_logical_pages=8, num_slots=2, backend=backend)
    cache.resolve(0, _t([0, 1, 2]))
    cache.begin_step()  # snapshotted, not raised
    cache.resolve(0, _t([10]))
    with pytest.raises(ValueError, match=r"1 id\(s\) .* also 1 missing page"):
        cache.check()  # the snapshot's count and the one since, at once
    cache.begin_step()
    cache.begin_step()  # raised once
    cache.resolve(0, _t([3, 4, 5]))
    cache.begin_step()
    cache.reset()  # drops the snapshot too
    cache.begin_step()
    cache.check()


@both_backends
def test_window_limits_the_scan(backend):
    cache = PageCache(num_layers=1, num_logical_pages=8, num_slots=4, window=2, backend=backend)
    _, miss_pages, miss_slots = cache.resolve(0, _t([0, 1, 2]))
    assert miss_pages.tolist() == [0, 1, -1] and miss_slots.tolist() == [0, 1, -1]  # free slots 2, 3 not scanned
    _, miss_pages, miss_slots = cache.resolve(0, _t([2]))  # the cursor moved on: slot 2
    assert miss_pages.tolist() == [2] and miss_slots.tolist() == [2]
    with pytest.raises(CacheCapacityError):
        cache.check()


def test_scan_stops_after_the_scopes_ids_with_the_same_result(monkeypatch):
    """A scope protects at most one slot per id it resolved, so `resolve` scans only that many ring positions more than
    the call's own ids; here the protected slots sit at the front of the ring (the worst case) and every miss still
    gets the slot the full scan (the reference) gives it."""
    cache, ref = PageCache(1, 1000, 200), RefCache(1, 1000, 200)
    lengths = []
    cumsum = torch.cumsum
    monkeypatch.setattr(torch, "cumsum", lambda x, dim: lengths.append(x.numel()) or cumsum(x, dim))
    fill = list(range(200))
    assert [t.tolist() for t in cache.resolve(0, _t(fill))] == list(ref.resolve(0, fill))
    for step in range(3):
        cache.begin_step()
        ref.begin_step()
        lengths.clear()
        ring = cache.owner[cache._ring[:50] - 1].tolist()  # the pages of the 50 least recently used slots
        new = list(range(200 + 50 * step, 250 + 50 * step))
        for ids in (ring, new):  # touch the ring's front, then 50 misses: 100 positions hold exactly 50 takeable
            assert [t.tolist() for t in cache.resolve(0, _t(ids))] == list(ref.resolve(0, ids))
        assert max(lengths) == 100 and ref.evictions == 50 * (step + 1)
    _assert_same_state(cache, ref)


@both_backends
def test_duplicates_counted_once_and_invalidate_frees(backend):
    cache = PageCache(num_layers=3, num_logical_pages=8, num_slots=8, backend=backend)
    cache.resolve(1, _t([2, 2, 2, 4]))
    cache.resolve(1, _t([4, 4]))
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 2
    cache.resolve(0, _t([4]))
    cache.invalidate(None, _t([4, -1]))
    assert cache.lookup(0, _t([4])).tolist() == [-1] and cache.lookup(1, _t([2, 4])).tolist() == [0, -1]
    assert cache.num_used_slots == 1 and cache.num_free_slots == 7
    # The ring is recomputed: freed slots (1, 2) come before the used slot 0.
    _, _, miss_slots = cache.resolve(2, _t([5, 6]))
    assert miss_slots.tolist() == [1, 2]
    cache.reset()
    assert cache.stats()["misses"] == 0 and cache.num_used_slots == 0 and cache.stamp == 0


@pytest.fixture(params=["fused", "five-launches"])
def resolve_launch(request, monkeypatch):
    """The Triton resolve as it launches (fused up to 1024 ids), or always in five launches of 16-id blocks."""
    if request.param == "five-launches":
        monkeypatch.setattr(page_cache_resolve, "_BLOCK", 16)
        monkeypatch.setattr(page_cache_resolve, "FUSED_LAUNCH", ())


@both_backends
@pytest.mark.parametrize("k", [1, 10, 30], ids=["ids20", "ids200", "ids600"])  # the fused tiers: 32, 256, 1024
def test_random_trace_matches_reference_at_scale(backend, resolve_launch, k):
    rng = random.Random(k)
    layers, pages, slots = 4, 300 * k, 96 * k
    cache, ref = PageCache(layers, pages, slots, backend=backend), RefCache(layers, pages, slots)
    for _ in range(60 // k + 4):
        cache.begin_step()
        ref.begin_step()
        for layer in range(layers):
            if layer:
                cache.begin_layer()
                ref.begin_layer()
            base = rng.randrange(pages - 40 * k)
            sel = [base + rng.randrange(40 * k) for _ in range(20 * k)] + [-1] * rng.randrange(3)
            assert [t.tolist() for t in cache.resolve(layer, _t(sel))] == list(ref.resolve(layer, sel))
        if rng.random() < 0.2:
            victim = [rng.randrange(pages) for _ in range(30)]
            cache.invalidate(None, _t(victim))
            ref.invalidate(None, victim)
    _assert_same_state(cache, ref)
    assert ref.evictions > 0 and ref.hits > 0


def test_the_guard_catches_a_sync():
    x = _t([1, 2])
    with pytest.MonkeyPatch.context() as mp:
        forbid_host_sync(mp)
        for sync in (x.tolist, lambda: x[x > 1], lambda: int(x[0]), lambda: torch.unique(x), lambda: bool(x[0])):
            with pytest.raises(AssertionError, match="sync-free path"):
                sync()
    assert x[x > 1].tolist() == [2]  # lifted


@both_backends
def test_resolve_calls_nothing_that_syncs(backend):
    cache = PageCache(num_layers=2, num_logical_pages=64, num_slots=8, backend=backend)
    with pytest.MonkeyPatch.context() as mp:
        forbid_host_sync(mp)
        cache.begin_layer()
        for layer in range(2):
            cache.resolve(layer, _t([3, 3, -1, 60, 70, 5, 9, 11, 12, 13, 14, 15, 16]))
    assert cache.stats()["misses"] == 20  # 10 distinct pages per layer, 8 slots: 2 + 10 unplaced (one scope)
    with pytest.raises(ValueError, match=r"2 id\(s\) .* also 12 missing page"):  # the 70s, read as padding
        cache.check()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: c.resolve(2, _t([0])), "layer"),
        (lambda c: c.resolve(0, torch.tensor([1.0])), "integer dtype"),
        (lambda c: c.resolve(0, torch.zeros(2, 2, dtype=torch.int64)), "1-D"),
        (lambda c: c.lookup(0, _t([9])), "pages"),
        (lambda c: c.lookup(0, _t([-2])), "pages"),
        (lambda c: c.invalidate(5, _t([0])), "layer"),
        (lambda c: c.invalidate(0, _t([8])), "pages"),
        (lambda c: PageCache(0, 4, 4), "num_layers"),
        (lambda c: PageCache(1, 4, -3), "num_slots"),
        (lambda c: PageCache(1, 4, 4, window=0), "window"),
        (lambda c: PageCache(1, 4, 4, backend="cuda"), "backend must be one of"),
        (lambda c: c.resolve(0, _t([1, 2]), torch.tensor([1, 0])), "fresh must be None or a bool tensor"),
        (lambda c: c.resolve(0, _t([1, 2]), torch.tensor([True])), "fresh must be None or a bool tensor"),
    ],
)
def test_bad_arguments(call, match):
    cache = PageCache(num_layers=2, num_logical_pages=8, num_slots=4)
    with pytest.raises(ValueError, match=match):
        call(cache)
    assert cache.num_used_slots == 0 and cache.stats()["misses"] == 0


@both_backends
def test_layer_scopes_replay_one_trace(backend):
    """begin_layer + resolve of one shape record the same trace in every scope and step (the stamp and the cursor
    are device state), so a CUDA graph captured once replays them; nothing in them syncs (also not inside C++)."""
    from tests.host_sync import graph_trace

    cache = PageCache(num_layers=2, num_logical_pages=64, num_slots=8, backend=backend)
    pages = torch.full((6,), -1, dtype=torch.int64)  # persistent input, refilled per step
    traces = []
    for step in range(3):
        cache.begin_step()
        pages.copy_(torch.tensor([step, step + 5, -1, 20 + step, 20 + step, 40]))
        with pytest.MonkeyPatch.context() as mp:
            with graph_trace(mp) as ops:
                for layer in range(2):
                    cache.begin_layer()
                    cache.resolve(layer, pages)
        traces.append(ops)
    assert traces[0] == traces[1] == traces[2]
    assert cache.stats()["evictions"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("size", [8, 40, 600], ids=["ids8", "ids40", "ids600"])  # each fused tier
def test_cuda_matches_cpu_without_syncs(resolve_launch, size):
    rng = random.Random(1)
    num_pages, num_slots = (500 if size < 500 else 5 * size), 128 * (1 + size // 128)
    cpu, gpu = PageCache(3, num_pages, num_slots), PageCache(3, num_pages, num_slots, device="cuda")
    for _ in range(40):
        cpu.begin_step()
        gpu.begin_step()
        for layer in range(3):
            if layer:
                cpu.begin_layer()
                gpu.begin_layer()
            sel = [rng.randrange(-1, num_pages) for _ in range(size)]
            a = cpu.resolve(layer, _t(sel))
            pages = _t(sel).cuda()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                b = gpu.resolve(layer, pages)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert all(x.tolist() == y.tolist() for x, y in zip(a, b))
    assert cpu.stats() == gpu.stats()
    assert torch.equal(cpu.resident, gpu.resident.cpu())
