"""`WorkingSetTracker` and the sizing helpers against a plain-Python reference and closed-form expectations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseserve_vllm.core.working_set import (
    NEVER,
    WorkingSetTracker,
    decode_budget_pages,
    page_bytes,
    prefill_pages,
)

HKV, PPB = 2, 2  # KV heads, pages per vLLM block


def owned_pages(blocks: list[int]) -> list[int]:
    """Logical flat page ids of a request owning `blocks`: (block * Hkv + head) * ppb + page_in_block."""
    return [(b * HKV + h) * PPB + j for b in blocks for h in range(HKV) for j in range(PPB)]


class RefTracker:
    """dict of last-selected steps per (layer, page)."""

    def __init__(self, window: int):
        self.window, self.step, self.last = window, 0, {}

    def record(self, layer: int, pages: list[int]) -> None:
        for p in pages:
            if p != -1:
                self.last[(layer, p)] = self.step

    def end_step(self) -> None:
        self.step += 1

    def forget(self, pages: list[int]) -> None:
        self.last = {k: v for k, v in self.last.items() if k[1] not in pages}

    def working_set(self, owned: list[int]) -> int:
        return sum(1 for (_, p), s in self.last.items() if p in owned and s >= self.step - self.window)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _run_trace(trace, num_layers, num_pages, window, requests):
    """trace[t][layer] = list of selected pages at step t. Returns per-step [ws per request] of tracker and ref."""
    tracker, ref = WorkingSetTracker(num_layers, num_pages, bytes_per_page=64, window=window), RefTracker(window)
    got, want = [], []
    for step in trace:
        for layer, pages in enumerate(step):
            tracker.record(layer, _t(pages))
            ref.record(layer, pages)
        tracker.end_step()
        ref.end_step()
        got.append(tracker.working_set_pages([_t(r) for r in requests]).tolist())
        want.append([ref.working_set(r) for r in requests])
    return got, want, tracker


def test_steady_selection_is_that_set():
    req = owned_pages([3, 4, 5])
    sel = req[:5]
    got, want, _ = _run_trace([[sel, sel[1:]]] * 20, num_layers=2, num_pages=64, window=12, requests=[req])
    assert got == want
    assert all(ws == [9] for ws in got)  # 5 pages in layer 0 + 4 in layer 1


def test_drifting_selection_is_union_of_window():
    req = owned_pages(list(range(20)))  # 80 pages
    k, window = 6, 4
    trace = [[req[t : t + k]] for t in range(40)]
    got, want, _ = _run_trace(trace, num_layers=1, num_pages=200, window=window, requests=[req])
    assert got == want
    for t, ws in enumerate(got):
        assert ws == [k + min(t, window - 1)]  # union of the last `window` sliding sets


def test_abrupt_topic_change_drops_old_set_after_window():
    req = owned_pages(list(range(10)))
    a, b = req[:8], req[20:28]
    window = 5
    trace = [[a, a]] * 10 + [[b, b]] * 10
    got, want, _ = _run_trace(trace, num_layers=2, num_pages=100, window=window, requests=[req])
    assert got == want
    assert [ws[0] for ws in got] == [16] * 10 + [32] * (window - 1) + [16] * (10 - window + 1)


def test_requests_are_separated_and_padded_input_matches_list():
    r0, r1 = owned_pages([0, 1]), owned_pages([2, 3, 4])
    tracker = WorkingSetTracker(3, 64, bytes_per_page=4096)
    tracker.record(0, _t([[r0[0], r1[0]], [r1[1], -1]]))  # any shape; -1 ignored
    tracker.record(2, _t([r0[0], r0[1], r0[1]]))
    tracker.end_step()
    padded = torch.full((2, len(r1)), -1, dtype=torch.int64)
    padded[0, : len(r0)] = _t(r0)
    padded[1] = _t(r1)
    assert tracker.working_set_pages(padded).tolist() == [3, 2]
    assert tracker.working_set_pages([_t(r0), _t(r1)]).tolist() == [3, 2]
    assert tracker.last_selected[1].eq(NEVER).all()
    tracker.forget(_t(r0 + [-1]))
    assert tracker.working_set_pages([_t(r0), _t(r1)]).tolist() == [0, 2]
    assert tracker.working_set_pages([]).tolist() == []


@settings(max_examples=60, deadline=None)
@given(
    window=st.integers(1, 6),
    steps=st.lists(
        st.tuples(
            st.lists(st.lists(st.integers(-1, 31), max_size=8), min_size=3, max_size=3),  # per-layer selections
            st.lists(st.integers(0, 31), max_size=4),  # pages forgotten after the step
        ),
        max_size=15,
    ),
)
def test_random_traces_match_reference(window, steps):
    requests = [list(range(0, 12)), list(range(12, 20)), list(range(20, 32)) + [3]]
    tracker, ref = WorkingSetTracker(3, 32, bytes_per_page=1, window=window), RefTracker(window)
    for selections, forgotten in steps:
        for layer, pages in enumerate(selections):
            tracker.record(layer, _t(pages))
            ref.record(layer, pages)
        # Mid-step (open step recorded) and after end_step both follow the documented window.
        assert tracker.working_set_pages([_t(r) for r in requests]).tolist() == [ref.working_set(r) for r in requests]
        tracker.end_step()
        ref.end_step()
        tracker.forget(_t(forgotten))
        ref.forget(forgotten)
        assert tracker.working_set_pages([_t(r) for r in requests]).tolist() == [ref.working_set(r) for r in requests]


def test_sizing_helpers():
    assert page_bytes(page_size=32, head_dim=128, element_size=2) == 16384  # the paper's 16 KB block
    # 32 layers x 8 KV heads x ceil(min(2048, 5000) / 32) = 64 pages.
    assert decode_budget_pages(num_layers=32, num_kv_heads=8, token_budget=2048, context_len=5000, page_size=32) == 32 * 8 * 64
    # Short context: the partial page counts.
    assert decode_budget_pages(num_layers=2, num_kv_heads=4, token_budget=2048, context_len=33, page_size=32) == 2 * 4 * 2
    assert decode_budget_pages(
        num_layers=4, num_kv_heads=2, token_budget=64, context_len=100, page_size=32, dense_layers=1
    ) == 2 * (3 * 2 + 1 * 4)
    lens = _t([0, 1, 100, 5000])
    assert decode_budget_pages(num_layers=2, num_kv_heads=3, token_budget=64, context_len=lens, page_size=32).tolist() == [
        0, 6, 12, 12,
    ]
    assert prefill_pages(num_layers=32, num_kv_heads=8, prompt_tokens=1000, page_size=32, layer_segmented=False) == 32 * 8 * 32
    assert prefill_pages(num_layers=32, num_kv_heads=8, prompt_tokens=1000, page_size=32, layer_segmented=True) == 8 * 32


def test_estimate_decode_bytes_falls_back_to_budget_without_history():
    tracker = WorkingSetTracker(num_layers=2, num_logical_pages=64, bytes_per_page=100)
    est = tracker.estimate_decode_bytes(_t([0, 7, 0]), _t([40, 999, 5000]), num_kv_heads=2, token_budget=64, page_size=16)
    assert est.tolist() == [2 * 2 * 3 * 100, 700, 2 * 2 * 4 * 100]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t: t.record(3, _t([0])), "layer"),
        (lambda t: t.record(0, _t([64])), "pages"),
        (lambda t: t.record(0, _t([-2])), "pages"),
        (lambda t: t.record(0, torch.tensor([0.5])), "integer tensor"),
        (lambda t: t.forget(_t([99])), "pages"),
        (lambda t: t.working_set_pages(_t([1, 2])), "2-D"),
        (lambda t: t.working_set_pages([_t([1]), _t([70])]), "owned_pages"),
        (lambda t: t.estimate_decode_bytes(_t([1]), _t([1, 2]), num_kv_heads=1, token_budget=8, page_size=8), "1-D"),
        (lambda t: t.estimate_decode_bytes(_t([1]), _t([1]), num_kv_heads=0, token_budget=8, page_size=8), "num_kv_heads"),
        (lambda t: WorkingSetTracker(2, 64, bytes_per_page=1, window=0), "window"),
        (lambda t: decode_budget_pages(num_layers=2, num_kv_heads=1, token_budget=8, context_len=1, page_size=8, dense_layers=3), "dense_layers"),
        (lambda t: prefill_pages(num_layers=2, num_kv_heads=1, prompt_tokens=-1, page_size=8, layer_segmented=True), "prompt_tokens"),
    ],
)
def test_bad_arguments(call, match):
    tracker = WorkingSetTracker(2, 64, bytes_per_page=1)
    with pytest.raises(ValueError, match=match):
        call(tracker)
    assert tracker.last_selected.eq(NEVER).all()
