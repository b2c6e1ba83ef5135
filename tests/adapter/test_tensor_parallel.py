"""Tensor parallelism on vLLM's CPU build: TP=2 over gloo, each rank selecting pages for its own KV head.

With a budget covering the context the greedy tokens equal vLLM's CPU_ATTN at TP=1. vLLM binds each CPU worker to
a NUMA node unless told otherwise; this machine has one node, so the two workers get one core each.
"""

import random

import pytest

from tests.conftest import engine, greedy

pytestmark = pytest.mark.engine


def test_tp2_equals_vllm_backend(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (900, 400)]
    model = tiny_model("llama")  # 2 KV heads: one per rank
    with engine(model, "CPU_ATTN", max_model_len=2048) as llm:
        dense = greedy(llm, prompts)
    with engine(model, "sparseserve", {"token_budget": 2048, "page_size": 16}, max_model_len=2048,
                tensor_parallel_size=2) as llm:
        got = greedy(llm, prompts)
    assert all(len(set(t)) >= 4 for t in dense), dense
    assert got == dense
