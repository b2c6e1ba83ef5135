"""`WorkingSetController`: FCFS prefix admission, starvation freedom, and the cap following the working set when
fed by `WorkingSetTracker` on synthetic selection traces (steady, drifting, abrupt topic change)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseserve_vllm.core.admission import WorkingSetController
from sparseserve_vllm.core.working_set import WorkingSetTracker

# Model geometry of the closed-loop traces: the budget estimate of a request without history is
# LAYERS * HKV * ceil(min(BUDGET, CONTEXT) / PAGE) = 2 * 2 * 4 = 16 pages, and every trace selects 8 pages per layer.
LAYERS, HKV, PPB, PAGE, BUDGET, CONTEXT = 2, 2, 2, 16, 64, 1024
PAGES_PER_REQUEST = 64
BYTES_PER_PAGE = 1000


def test_prefix_greedy_fcfs():
    ctl = WorkingSetController()
    d = ctl.admit([("a", 40), ("b", 30), ("c", 50), ("d", 10)], capacity_bytes=100)
    # "c" does not fit, so the batch ends there even though "d" alone would fit.
    assert d.admitted == ("a", "b") and d.rejected == ("c", "d")
    assert (d.used_bytes, d.demand_bytes, d.cap, d.overcommitted) == (70, 130, 2, False)
    assert (ctl.last_cap, ctl.last_used_bytes, ctl.last_demand_bytes) == (2, 70, 130)
    d = ctl.admit([("a", 60), ("b", 40)], capacity_bytes=100)
    assert d.admitted == ("a", "b") and d.rejected == () and d.used_bytes == 100  # exactly full fits


def test_head_always_admitted():
    ctl = WorkingSetController()
    d = ctl.admit([(7, 500), (8, 1)], capacity_bytes=100)
    assert d.admitted == (7,) and d.rejected == (8,) and d.overcommitted
    d = ctl.admit([], capacity_bytes=100)
    assert d.admitted == () and ctl.last_cap == 0 and ctl.last_demand_bytes == 0


@pytest.mark.parametrize(
    "candidates, capacity, match",
    [
        ([("a", 1)], -1, "capacity_bytes"),
        ([("a", 1)], 1.5, "capacity_bytes"),
        ([("a", -1)], 10, "ws_bytes"),
        ([("a", 2.0)], 10, "ws_bytes"),
        ([("a", 1, 2)], 10, "pair"),
        ([("a", 1), ("a", 2)], 10, "distinct"),
    ],
)
def test_bad_arguments(candidates, capacity, match):
    ctl = WorkingSetController()
    with pytest.raises(ValueError, match=match):
        ctl.admit(candidates, capacity)
    assert ctl.last_decision is None


@settings(max_examples=80, deadline=None)
@given(
    capacity=st.integers(0, 100),
    requests=st.lists(st.tuples(st.integers(0, 150), st.integers(1, 5)), min_size=1, max_size=25),
    arrivals_per_step=st.integers(1, 4),
)
def test_every_request_is_eventually_admitted(capacity, requests, arrivals_per_step):
    """Requests arrive over time with a working set and a number of steps to run; admitted ones progress and
    finish. Every request finishes, and the queue head progresses every step."""
    ctl = WorkingSetController()
    remaining = {i: steps for i, (_, steps) in enumerate(requests)}
    queue: list[int] = []
    arrived = 0
    total_steps = sum(steps for _, steps in requests)
    for step in range(len(requests) + total_steps + 1):
        queue += range(arrived, min(arrived + arrivals_per_step, len(requests)))
        arrived = min(arrived + arrivals_per_step, len(requests))
        if not queue:
            continue
        decision = ctl.admit([(i, requests[i][0]) for i in queue], capacity)
        assert decision.admitted[0] == queue[0]
        for i in decision.admitted:
            remaining[i] -= 1
        queue = [i for i in queue if remaining[i] > 0]
    assert arrived == len(requests) and not queue and all(v == 0 for v in remaining.values())


def _owned(request: int) -> torch.Tensor:
    """Logical flat pages of a request owning blocks [request*16, request*16 + 16) (HKV heads, PPB pages each)."""
    blocks = PAGES_PER_REQUEST // (HKV * PPB)
    ids = [(b * HKV + h) * PPB + j for b in range(request * blocks, (request + 1) * blocks) for h in range(HKV) for j in range(PPB)]
    return torch.tensor(ids, dtype=torch.int64)


def _closed_loop(num_requests: int, capacity_pages: int, window: int, steps: int, selection) -> list[int]:
    """Each step: estimate every request's working set, admit the FCFS prefix, record what the admitted select.

    `selection(step)` gives the indices (into a request's owned pages) each admitted request selects, per layer.
    Returns the cap of every step.
    """
    tracker = WorkingSetTracker(LAYERS, num_requests * PAGES_PER_REQUEST, BYTES_PER_PAGE, window=window)
    ctl = WorkingSetController()
    owned = [_owned(r) for r in range(num_requests)]
    caps = []
    for step in range(steps):
        est = tracker.estimate_decode_bytes(
            tracker.working_set_pages(owned),
            torch.full((num_requests,), CONTEXT),
            num_kv_heads=HKV,
            token_budget=BUDGET,
            page_size=PAGE,
        )
        decision = ctl.admit(list(enumerate(est.tolist())), capacity_pages * BYTES_PER_PAGE)
        caps.append(decision.cap)
        for layer in range(LAYERS):
            idx = torch.tensor(selection(step), dtype=torch.int64)
            tracker.record(layer, torch.stack([owned[r][idx] for r in decision.admitted]))
        tracker.end_step()
    return caps


def test_cap_steady_selection():
    # Same 8 pages per layer every step: working set 16 pages, equal to the budget estimate.
    caps = _closed_loop(num_requests=16, capacity_pages=16 * 5 + 7, window=12, steps=30, selection=lambda s: range(8))
    assert caps == [5] * 30


def test_cap_drifting_selection():
    # The 8 selected pages slide by one page per step. Before step s >= 1 the admitted requests ran min(s, 12)
    # steps of the window, whose union is 8 + min(s, 12) - 1 pages per layer: the working set grows to
    # 2 * (8 + 11) = 38 pages and the cap shrinks with it, then stays. Step 0 uses the budget estimate (16 pages).
    window, capacity = 12, 200
    caps = _closed_loop(16, capacity, window, steps=30, selection=lambda s: range(s, s + 8))
    expected = [capacity // (2 * (7 + min(max(s, 1), window))) for s in range(30)]
    assert caps == expected
    assert expected[:3] == [12, 12, 11] and expected[-1] == 5


def test_cap_abrupt_topic_change():
    # Set A for 10 steps, then set B: for window - 1 steps the working set is A | B (32 pages) and the cap halves;
    # once A is older than the window it recovers.
    window, change = 6, 10
    caps = _closed_loop(
        8, capacity_pages=64, window=window, steps=25, selection=lambda s: range(8) if s < change else range(16, 24)
    )
    assert caps == [4] * (change + 1) + [2] * (window - 1) + [4] * (25 - change - window)
