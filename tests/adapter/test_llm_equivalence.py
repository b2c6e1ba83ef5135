"""With a token budget that covers the whole context, SparseServe's tokens equal vLLM's own backend.

Real vLLM 0.26 (CPU build), real pretrained SmolLM2-135M-Instruct, prompts of 2K+ tokens; the plugin's counters
prove that its sparse decode path (not CPU_ATTN) produced the tokens.
"""

import time

import pytest

from sparseserve_vllm import stats
from sparseserve_vllm.prompts import long_prompt
from tests.conftest import abort_and_drain, engine, greedy

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


@pytest.mark.parametrize("selector", ["cuboid_mean", "quest", "mean"])
def test_full_budget_equals_vllm_backend_on_smollm2(smollm2, smol_prompts, dense_tokens, selector):
    before = stats.read_totals()
    with engine(smollm2, "sparseserve", {"token_budget": 4096, "selector": selector}, max_model_len=4096) as llm:
        got = greedy(llm, smol_prompts)
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


OFFLOAD = {"offload": True, "host_kv_gib": 1.0}
KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4  # SmolLM2: layers x KV heads x head dim x (K, V) x float32


def test_offload_with_a_small_hbm_cache_equals_dense_and_frees_every_page(smollm2, smol_prompts, dense_tokens):
    """All KV in host DRAM and an HBM page cache of 15 MiB (about 1.5 of SmolLM2's 30 layers of this batch): pages are
    evicted and loaded on every decode layer-step, and with a budget covering the context the tokens equal dense."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    before = stats.read_totals()
    # max_num_batched_tokens 512: the 2K-token prompts are prefilled layer by layer (layer-segmented prefill).
    with engine(smollm2, "sparseserve", {**OFFLOAD, "token_budget": 4096, "hbm_cache_gib": 0.015},
                max_model_len=4096, max_num_batched_tokens=512) as llm:
        got = greedy(llm, smol_prompts)
        time.sleep(1.2)
        done = stats.read_totals()
        # An aborted request gives its pages back too.
        eng = llm.llm_engine
        eng.add_request("aborted", TokensPrompt(prompt_token_ids=smol_prompts[0]),
                        SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        for _ in range(1000):  # until it decodes (its prefill runs layer-segmented over several steps)
            if any(o.request_id == "aborted" and o.outputs[0].token_ids for o in eng.step()):
                break
        eng.step()
        time.sleep(1.2)
        mid = stats.read_totals()
        after_abort = abort_and_drain(eng, "aborted")
    assert got == dense_tokens
    delta = {k: done[k] - before[k] for k in stats.COUNTER_NAMES}
    assert delta["segment_token_layers"] == 30 * sum(len(p) for p in smol_prompts), delta
    # Each prompt's last token attended with the output its prefill kept (the jobs end in different steps).
    assert delta["segment_last_token_layers"] == 30 * len(smol_prompts), delta
    assert delta["hbm_evictions"] >= delta["decode_steps"] > 0 and delta["hbm_misses"] > 0
    kv_bytes = sum(len(p) for p in smol_prompts) * KV_BYTES_PER_TOKEN
    assert delta["bytes_d2h"] >= kv_bytes and delta["bytes_h2d"] > 0
    # Finished and aborted requests give back every HBM page and every host block.
    assert done["hbm_pages_in_use"] == 0 and done["host_blocks_in_use"] == 0, done
    assert mid["hbm_pages_in_use"] > 0 and mid["host_blocks_in_use"] > 0, mid
    assert after_abort["hbm_pages_in_use"] == 0 and after_abort["host_blocks_in_use"] == 0, after_abort


def test_offload_runs_together_requests_whose_kv_is_many_times_the_hbm_cache(smollm2, smol_prompts):
    """Budget 256 and a one-step working-set window: each request's decode working set (8 pages per KV head and layer,
    11 MiB) is small, so the three requests decode in the same steps while their KV (about 300 MB in all) is more
    than 4x the 48 MiB HBM cache. (With the default 12-step window the union of selections is several times larger
    and the working-set scheduler runs them one by one.)"""
    cache_gib = 0.047
    kv_bytes = sum(len(p) for p in smol_prompts) * KV_BYTES_PER_TOKEN
    assert kv_bytes >= 4 * cache_gib * 2**30
    before = stats.read_totals()
    with engine(smollm2, "sparseserve", {**OFFLOAD, "token_budget": 256, "hbm_cache_gib": cache_gib,
                                          "working_set_window": 1}, max_model_len=4096) as llm:
        got = greedy(llm, smol_prompts, max_tokens=32)
        time.sleep(1.2)
        after = stats.read_totals()
    assert all(len(t) == 32 for t in got)
    delta = {k: after[k] - before[k] for k in stats.COUNTER_NAMES}
    assert delta["decode_queries"] >= 2.5 * delta["decode_steps"], delta
    assert delta["hbm_evictions"] > 0 and delta["pages_selected"] < delta["pages_scored"]
