"""With a token budget that covers the whole context, SparseServe's tokens equal vLLM's own backend.

Real vLLM 0.26 (CPU build), real pretrained SmolLM2-135M-Instruct, prompts of 2K+ tokens; the plugin's counters
prove that its sparse decode path (not CPU_ATTN) produced the tokens.
"""

import pytest

from sparseserve_vllm import stats
from tests.adapter.prompts import long_prompt
from tests.conftest import engine, greedy

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def smol_prompts(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    prompts = [tok(long_prompt(seed, 1400)).input_ids for seed in range(3)]
    assert all(len(p) >= 2048 for p in prompts), [len(p) for p in prompts]
    return prompts


@pytest.fixture(scope="module")
def dense_tokens(smollm2, smol_prompts):
    with engine(smollm2, "CPU_ATTN", max_model_len=4096) as llm:
        return greedy(llm, smol_prompts)


def test_full_budget_equals_vllm_backend_on_smollm2(smollm2, smol_prompts, dense_tokens):
    before = stats.read_totals()
    with engine(smollm2, "sparseserve", {"token_budget": 4096}, max_model_len=4096) as llm:
        got = greedy(llm, smol_prompts)
        import time

        time.sleep(1.2)  # the workers publish their counters twice a second
        after = stats.read_totals()
    # The reference must be a real continuation (a broken model emits one token id over and over).
    assert all(len(set(t)) >= 3 for t in dense_tokens), dense_tokens
    assert got == dense_tokens
    steps = after["decode_steps"] - before["decode_steps"]
    # 30 layers x 11 decode steps (the first token comes from the prefill), batched.
    assert steps >= 30 * 11, after
    assert after["pages_scored"] > before["pages_scored"]
    assert after["tokens_attended"] - before["tokens_attended"] >= 3 * 3 * 30 * 11 * 2048
