"""Llama, Qwen2 and Gemma tiny models: with a budget covering the context, SparseServe's greedy tokens equal
vLLM's CPU_ATTN for each page selector (one selector per family, so every selector runs on a different model)."""

import random

import pytest

from tests.conftest import engine, greedy

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("family, selector", [("llama", "quest"), ("qwen2", "mean"), ("gemma", "cuboid_mean")])
def test_full_budget_equals_vllm_backend(tiny_model, family, selector):
    rng = random.Random(family)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (1500, 700, 1130)]
    model = tiny_model(family)
    with engine(model, "CPU_ATTN", max_model_len=2048) as llm:
        dense = greedy(llm, prompts, max_tokens=16)
    with engine(model, "sparseserve", {"token_budget": 2048, "page_size": 16, "selector": selector},
                max_model_len=2048) as llm:
        got = greedy(llm, prompts, max_tokens=16)
    assert all(len(set(t)) >= 4 for t in dense), dense
    assert got == dense
