"""`core.segment_plan`: which (layer, token range) units of which prompts one engine step runs."""

import random

import pytest

from sparseserve_vllm.core.segment_plan import SegmentProgress, plan_step


def run_to_end(progress, per_step, max_steps=10_000):
    """Every step's plan until all prompts are done."""
    steps = []
    while not all(p.done for p in progress):
        steps.append(plan_step(progress, per_step))
        assert steps[-1], "a step made no progress"
        assert len(steps) < max_steps
    return steps


def test_a_prompt_within_the_budget_runs_whole_layers():
    p = SegmentProgress(num_tokens=1000, num_layers=8)
    steps = run_to_end([p], per_step=2500)
    # Two whole layers a step (2000 of 2500 units), never a part of a layer.
    assert steps == [[(0, 2 * s, 0, 1000), (0, 2 * s + 1, 0, 1000)] for s in range(4)]


def test_a_prompt_longer_than_the_budget_runs_chunks_within_a_layer():
    p = SegmentProgress(num_tokens=5000, num_layers=2)
    steps = run_to_end([p], per_step=2000)
    assert steps[0] == [(0, 0, 0, 2000)]
    assert steps[1] == [(0, 0, 2000, 4000)]
    assert steps[2] == [(0, 0, 4000, 5000), (0, 1, 0, 1000)]  # the rest of layer 0, then layer 1 begins
    assert all(sum(e - s for _, _, s, e in step) <= 2000 for step in steps)


def test_later_prompts_use_what_is_left_but_never_overtake():
    a, b = SegmentProgress(300, 2), SegmentProgress(100, 2)
    assert plan_step([a, b], per_step=500) == [(0, 0, 0, 300)]  # b waits while a is unfinished
    assert plan_step([a, b], per_step=500) == [(0, 1, 0, 300), (1, 0, 0, 100), (1, 1, 0, 100)]  # a ends, b uses the rest
    assert a.done and b.done
    # A prompt that gets nothing stops the walk: c (150 tokens) cannot run a layer in the 100 left after d's first
    # layer, and e behind it waits although it would fit.
    d, c, e = SegmentProgress(400, 3), SegmentProgress(150, 1), SegmentProgress(50, 1)
    assert plan_step([d, c, e], per_step=500) == [(0, 0, 0, 400)]


@pytest.mark.parametrize("seed", range(20))
def test_every_token_of_every_layer_runs_once_in_layer_order(seed):
    rng = random.Random(seed)
    per_step = rng.randrange(1, 3000)
    lengths = [rng.randrange(1, 4000) for _ in range(rng.randrange(1, 5))]
    layers = rng.randrange(1, 6)
    progress = [SegmentProgress(n, layers) for n in lengths]
    seen = {i: [] for i in range(len(lengths))}
    for step in run_to_end(progress, per_step):
        assert sum(e - s for _, _, s, e in step) <= per_step
        for i, layer, start, end in step:
            assert start < end
            seen[i].append((layer, start, end))
    for i, units in seen.items():
        # Layer-major and contiguous: each layer's units tile [0, n) before the next layer starts.
        cursor = (0, 0)
        for layer, start, end in units:
            assert (layer, start) == cursor
            cursor = (layer, end) if end < lengths[i] else (layer + 1, 0)
            if lengths[i] <= per_step:
                assert (start, end) == (0, lengths[i])  # short prompts never split a layer
        assert cursor == (layers, 0)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_tokens"):
        SegmentProgress(0, 4)
    with pytest.raises(ValueError, match="per_step"):
        plan_step([SegmentProgress(4, 4)], 0)
