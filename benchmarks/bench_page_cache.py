"""Benchmark: `PageCache.resolve` throughput against a plain `OrderedDict` LRU, on the same selection trace.

Run: `python -m pytest benchmarks/bench_page_cache.py --benchmark-only -q` (CPU; on a CUDA machine the `cuda`
variant runs too). One round replays a whole decode trace (STEPS steps x LAYERS layers, one `resolve` per layer
with the pages selected by every request) on an empty cache; `extra_info["pages_per_s"]` is the resolved pages
per second of the mean round and `extra_info["misses_per_round"]` the misses (equal for both: the cache holds two
steps' selections, so the per-step eviction protection never binds). Both implementations see identical pages in the same order.

The CPU variant runs torch with one intra-op thread, as the baseline has one thread (on a loaded machine extra
torch threads only add contention).

Trace: REQUESTS requests x HKV KV heads, each head selecting `per_head` distinct pages per step out of a window of
`per_head * 5 // 4` of its pages that drifts by a few pages every step, so consecutive steps mostly hit.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from sparseserve_vllm.core.page_cache import PageCache

LAYERS, REQUESTS, HKV, PAGES_PER_HEAD, STEPS = 4, 16, 8, 512, 6
NUM_LOGICAL_PAGES = REQUESTS * HKV * PAGES_PER_HEAD


def _trace(per_head: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """trace[step][layer]: int64 [REQUESTS * HKV * per_head] logical flat page ids."""
    gen = torch.Generator().manual_seed(seed)
    span = per_head * 5 // 4
    base = torch.arange(REQUESTS * HKV, dtype=torch.int64)[:, None] * PAGES_PER_HEAD  # first page of each head
    trace = []
    for step in range(STEPS):
        layers = []
        for _ in range(LAYERS):
            offset = step * max(1, per_head // 16)
            pick = torch.rand(REQUESTS * HKV, span, generator=gen).argsort(dim=1)[:, :per_head]
            layers.append((base + (offset + pick) % PAGES_PER_HEAD).reshape(-1))
        trace.append(layers)
    return trace


class OrderedDictLRU:
    """Baseline: one dict operation per page; same slot semantics except for the per-step eviction protection."""

    def __init__(self, num_slots: int):
        self.lru: OrderedDict[int, int] = OrderedDict()
        self.free = list(range(num_slots - 1, -1, -1))

    def resolve(self, layer: int, pages: list[int]) -> tuple[list[int], list[int], list[int]]:
        slots, miss_pages, miss_slots = [], [], []
        lru = self.lru
        for page in pages:
            key = layer * NUM_LOGICAL_PAGES + page
            slot = lru.get(key)
            if slot is None:
                slot = self.free.pop() if self.free else lru.popitem(last=False)[1]
                lru[key] = slot
                miss_pages.append(page)
                miss_slots.append(slot)
            else:
                lru.move_to_end(key)
            slots.append(slot)
        return slots, miss_pages, miss_slots


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("per_head", [16, 64])
@pytest.mark.parametrize("device", _devices())
def test_page_cache_resolve(benchmark, one_cpu_thread, device, per_head):
    trace = [[pages.to(device) for pages in step] for step in _trace(per_head)]
    num_slots = 2 * LAYERS * REQUESTS * HKV * per_head

    misses = []

    def replay(cache: PageCache) -> None:
        for step in trace:
            cache.begin_step()
            for layer, pages in enumerate(step):
                cache.resolve(layer, pages)
        if device == "cuda":
            torch.cuda.synchronize()
        misses.append(cache.stats()["misses"])

    def fresh():
        return (PageCache(LAYERS, NUM_LOGICAL_PAGES, num_slots, device=device),), {}

    replay(fresh()[0][0])  # warm-up (allocator, kernels)
    benchmark.group = f"resolve per_head={per_head}"
    benchmark.pedantic(replay, setup=fresh, rounds=5, iterations=1)
    _report(benchmark, trace, misses[-1])


@pytest.mark.parametrize("per_head", [16, 64])
def test_ordered_dict_baseline(benchmark, per_head):
    trace = [[pages.tolist() for pages in step] for step in _trace(per_head)]
    num_slots = 2 * LAYERS * REQUESTS * HKV * per_head

    misses = []

    def replay(cache: OrderedDictLRU) -> None:
        num_misses = 0
        for step in trace:
            for layer, pages in enumerate(step):
                num_misses += len(cache.resolve(layer, pages)[1])
        misses.append(num_misses)

    benchmark.group = f"resolve per_head={per_head}"
    benchmark.pedantic(replay, setup=lambda: ((OrderedDictLRU(num_slots),), {}), rounds=5, iterations=1)
    _report(benchmark, trace, misses[-1])


def _report(benchmark, trace, misses: int) -> None:
    pages = sum(len(p) for step in trace for p in step)
    benchmark.extra_info["pages_per_round"] = pages
    benchmark.extra_info["misses_per_round"] = misses
    benchmark.extra_info["pages_per_s"] = pages / benchmark.stats.stats.mean
