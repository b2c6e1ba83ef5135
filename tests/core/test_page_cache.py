"""`PageCache` against a plain-Python reference model with the same documented semantics.

Reference semantics (the module docstring of `page_cache`): hits are touched with the current stamp; the distinct
misses, in ascending page order, take the slots whose last use is older than the stamp (free slots count as last
use -1) in ascending (last use, slot id) order; too many misses raise `CacheCapacityError` and change nothing.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sparseserve_vllm.core.page_cache import CacheCapacityError, PageCache


class RefCache:
    """dict + stamps: the obvious Python implementation of the documented semantics."""

    def __init__(self, num_layers: int, num_pages: int, num_slots: int):
        self.num_layers, self.num_pages, self.num_slots = num_layers, num_pages, num_slots
        self.reset()

    def reset(self) -> None:
        self.slot_of: dict[tuple[int, int], int] = {}
        self.key_of: list[tuple[int, int] | None] = [None] * self.num_slots
        self.last: list[int] = [-1] * self.num_slots
        self.stamp = 0
        self.hits = self.misses = self.evictions = 0

    def begin_step(self) -> None:
        self.stamp += 1

    def resolve(self, layer: int, pages: list[int]):
        distinct = sorted({p for p in pages if p != -1})
        hit_slots = {self.slot_of[(layer, p)] for p in distinct if (layer, p) in self.slot_of}
        misses = [p for p in distinct if (layer, p) not in self.slot_of]
        takeable = sorted(
            (s for s in range(self.num_slots) if self.last[s] < self.stamp and s not in hit_slots),
            key=lambda s: (self.last[s], s),
        )
        if len(misses) > len(takeable):
            raise CacheCapacityError(f"{len(misses)} > {len(takeable)}")
        for s in hit_slots:
            self.last[s] = self.stamp
        for p, s in zip(misses, takeable):
            if self.key_of[s] is not None:
                del self.slot_of[self.key_of[s]]
                self.evictions += 1
            self.key_of[s] = (layer, p)
            self.slot_of[(layer, p)] = s
            self.last[s] = self.stamp
        self.hits += len(hit_slots)
        self.misses += len(misses)
        slots = [self.slot_of[(layer, p)] if p != -1 else -1 for p in pages]
        return slots, misses, takeable[: len(misses)]

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
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (ref.hits, ref.misses, ref.evictions)
    assert stats["used_slots"] == len(ref.slot_of) == cache.num_used_slots
    assert cache.num_free_slots == ref.num_slots - len(ref.slot_of)
    # No two keys share a slot, and resident/owner agree both ways.
    resident = cache.resident.reshape(-1)
    cached = resident[resident >= 0]
    assert cached.unique().numel() == cached.numel()
    for slot, key in enumerate(cache.owner.tolist()):
        if key >= 0:
            assert resident[key].item() == slot


L, P, S = 2, 10, 5
page_lists = st.lists(st.integers(min_value=-1, max_value=P - 1), max_size=9)


class PageCacheMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.cache = PageCache(L, P, S)
        self.ref = RefCache(L, P, S)

    @rule()
    def begin_step(self):
        self.cache.begin_step()
        self.ref.begin_step()

    @rule(layer=st.integers(0, L - 1), pages=page_lists)
    def resolve(self, layer, pages):
        try:
            expected = self.ref.resolve(layer, pages)
        except CacheCapacityError:
            with pytest.raises(CacheCapacityError, match="slots"):
                self.cache.resolve(layer, _t(pages))
            event("capacity error")
            return
        slots, miss_pages, miss_slots = self.cache.resolve(layer, _t(pages))
        assert slots.dtype == torch.int32 and miss_slots.dtype == torch.int32 and miss_pages.dtype == torch.int64
        assert (slots.tolist(), miss_pages.tolist(), miss_slots.tolist()) == expected

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


PageCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPageCacheMachine = PageCacheMachine.TestCase


def test_lru_order_and_stamp_protection():
    cache = PageCache(num_layers=2, num_logical_pages=16, num_slots=4)
    slots, miss_pages, miss_slots = cache.resolve(0, _t([7, 3, 3, -1, 5]))
    # Misses in ascending page order take free slots lowest first; duplicates get the same slot.
    assert miss_pages.tolist() == [3, 5, 7] and miss_slots.tolist() == [0, 1, 2]
    assert slots.tolist() == [2, 0, 0, -1, 1]
    cache.begin_step()
    cache.resolve(0, _t([5]))  # touch page 5 (slot 1) at stamp 1
    _, miss_pages, miss_slots = cache.resolve(1, _t([0, 1]))
    # Free slot 3 first, then the LRU among stamp-0 slots {0, 2}: lowest slot id 0 (page 3 evicted).
    assert miss_pages.tolist() == [0, 1] and miss_slots.tolist() == [3, 0]
    assert cache.lookup(0, _t([3, 5, 7])).tolist() == [-1, 1, 2]
    # Only slot 2 is older than the current stamp: two misses cannot fit, and nothing changes.
    before = (cache.resident.clone(), cache.owner.clone(), cache.last_use.clone(), cache.stats())
    with pytest.raises(CacheCapacityError, match=r"needs 2 slots .* only 1 of 4"):
        cache.resolve(0, _t([8, 9, 5]))
    after = (cache.resident, cache.owner, cache.last_use, cache.stats())
    assert all(torch.equal(a, b) for a, b in zip(before[:3], after[:3])) and before[3] == after[3]
    assert cache.stats() == {
        "hits": 1, "misses": 5, "evictions": 1, "used_slots": 4, "free_slots": 0, "num_slots": 4, "stamp": 1,
    }


def test_duplicates_counted_once_and_invalidate_frees():
    cache = PageCache(num_layers=3, num_logical_pages=8, num_slots=8)
    cache.resolve(1, _t([2, 2, 2, 4]))
    cache.resolve(1, _t([4, 4]))
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 2
    cache.resolve(0, _t([4]))
    cache.invalidate(None, _t([4, -1]))
    assert cache.lookup(0, _t([4])).tolist() == [-1] and cache.lookup(1, _t([2, 4])).tolist() == [0, -1]
    assert cache.num_used_slots == 1 and cache.num_free_slots == 7
    cache.reset()
    assert cache.stats()["misses"] == 0 and cache.num_used_slots == 0 and cache.stamp == 0


def test_random_trace_matches_reference_at_scale():
    rng = random.Random(0)
    layers, pages, slots = 4, 300, 96
    cache, ref = PageCache(layers, pages, slots), RefCache(layers, pages, slots)
    for _ in range(60):
        cache.begin_step()
        ref.begin_step()
        for layer in range(layers):
            base = rng.randrange(pages - 40)
            sel = [base + rng.randrange(40) for _ in range(20)] + [-1] * rng.randrange(3)
            assert [t.tolist() for t in cache.resolve(layer, _t(sel))] == list(ref.resolve(layer, sel))
        if rng.random() < 0.2:
            victim = [rng.randrange(pages) for _ in range(30)]
            cache.invalidate(None, _t(victim))
            ref.invalidate(None, victim)
    _assert_same_state(cache, ref)
    assert ref.evictions > 0 and ref.hits > 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: c.resolve(2, _t([0])), "layer"),
        (lambda c: c.resolve(0, _t([8])), "pages"),
        (lambda c: c.resolve(0, _t([-2])), "pages"),
        (lambda c: c.resolve(0, torch.tensor([1.0])), "integer dtype"),
        (lambda c: c.resolve(0, torch.zeros(2, 2, dtype=torch.int64)), "1-D"),
        (lambda c: c.lookup(0, _t([9])), "pages"),
        (lambda c: c.invalidate(5, _t([0])), "layer"),
        (lambda c: PageCache(0, 4, 4), "num_layers"),
        (lambda c: PageCache(1, 4, -3), "num_slots"),
    ],
)
def test_bad_arguments(call, match):
    cache = PageCache(num_layers=2, num_logical_pages=8, num_slots=4)
    with pytest.raises(ValueError, match=match):
        call(cache)
    assert cache.num_used_slots == 0 and cache.stats()["misses"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rng = random.Random(1)
    cpu, gpu = PageCache(3, 500, 128), PageCache(3, 500, 128, device="cuda")
    for _ in range(40):
        cpu.begin_step()
        gpu.begin_step()
        for layer in range(3):
            sel = [rng.randrange(-1, 500) for _ in range(40)]
            a = cpu.resolve(layer, _t(sel))
            b = gpu.resolve(layer, _t(sel).cuda())
            assert all(x.tolist() == y.tolist() for x, y in zip(a, b))
    assert cpu.stats() == gpu.stats()
    assert torch.equal(cpu.resident, gpu.resident.cpu())
