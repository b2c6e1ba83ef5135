"""Tensor parallelism on vLLM's CPU build: TP=2 over gloo, each rank selecting pages for its own KV head.

With a budget covering the context the greedy tokens equal vLLM's CPU_ATTN at TP=1, without offload and with
offload (each rank its own host tier and page cache; working sets summed over the ranks). vLLM binds each CPU
worker to a NUMA node unless told otherwise; this machine has one node, so the two workers get one core each.
"""

import random
import time

import pytest

from sparseserve_vllm import stats
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
    # Offload at TP=2, with an HBM cache per rank far smaller than the prompts' KV (88 pages of 16 tokens of the
    # rank's one KV head; the 900-token request's decode reads 57 a layer, so every decode step evicts): same
    # tokens, the prompts prefilled layer by layer on both ranks (max_num_batched_tokens 256), and every page is
    # given back on both ranks when the requests finish.
    ss = {"token_budget": 1024, "page_size": 16, "offload": True, "host_kv_gib": 0.02, "hbm_cache_gib": 0.00034}
    before = stats.read_totals()
    with engine(model, "sparseserve", ss, max_model_len=2048, tensor_parallel_size=2,
                max_num_batched_tokens=256) as llm:
        got = greedy(llm, prompts)
        time.sleep(1.2)  # the workers publish their counters twice a second
        after = stats.read_totals()
    assert got == dense
    assert after["hbm_evictions"] > before["hbm_evictions"]
    # Both ranks ran every unit: 2 x 2 layers x (900 + 400) token-layers, and took both last tokens' attention from it.
    assert after["segment_token_layers"] - before["segment_token_layers"] == 2 * 2 * (900 + 400), after
    assert after["segment_last_token_layers"] - before["segment_last_token_layers"] == 2 * 2 * 2, after
    assert after["hbm_pages_in_use"] == 0 and after["host_blocks_in_use"] == 0, after
