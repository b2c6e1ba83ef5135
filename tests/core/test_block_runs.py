"""plan_block_runs against a plain reference: sorted ids, maximal runs of consecutive ids, long ones copied."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseserve_vllm.core.block_runs import plan_block_runs


def reference(ids, block_bytes, min_copy_bytes):
    runs, rest, order = [], [], []
    pos = {b: i for i, b in enumerate(ids)}
    group = []
    for b in sorted(ids) + [None]:
        if group and (b is None or b != group[-1] + 1):
            if len(group) * block_bytes >= min_copy_bytes:
                runs.append((group[0], len(group)))
                order += [pos[x] for x in group]
            else:
                rest += [pos[x] for x in group]
            group = []
        if b is not None:
            group.append(b)
    return order, runs, sorted(rest)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 60), unique=True, max_size=40), block_bytes=st.integers(1, 5),
       min_copy_bytes=st.integers(0, 20), as_tensor=st.booleans())
def test_plan_matches_reference(ids, block_bytes, min_copy_bytes, as_tensor):
    plan = plan_block_runs(torch.tensor(ids, dtype=torch.int64) if as_tensor else ids, block_bytes, min_copy_bytes)
    order, runs, rest = reference(ids, block_bytes, min_copy_bytes)
    assert plan.order.tolist() == order and plan.runs == runs and plan.rest.tolist() == rest
    assert plan.identity == (not rest and order == list(range(len(ids))))
    # the copied blocks, packed in `order`, are exactly the runs laid end to end
    assert [ids[i] for i in plan.order] == [b for first, n in plan.runs for b in range(first, first + n)]


def test_bad_ids_and_sizes():
    with pytest.raises(ValueError, match="distinct"):
        plan_block_runs([3, 1, 3], 4, 0)
    with pytest.raises(ValueError, match=">= 0"):
        plan_block_runs(np.array([2, -1]), 4, 0)
    with pytest.raises(ValueError, match="block_bytes"):
        plan_block_runs([1], 0, 0)
