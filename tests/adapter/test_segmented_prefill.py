"""Layer-segmented prefill on real vLLM 0.26 (CPU build) with offload: same tokens as plain prefill, decodes of other
requests in the same engine steps, one layer's prompt KV held at a time, and aborted prefills give their blocks back.

Tiny random models of 6 layers (hidden 128, 2 KV heads of dimension 32, float32) and `max_num_batched_tokens=64`,
so every prompt longer than 64 tokens is prefilled layer by layer, 64 x 6 = 384 token x layer units per step.
"""

import random
import time

import pytest

from sparseserve_vllm import stats
from sparseserve_vllm.core import flash_d2h
from tests.conftest import abort_and_drain, engine, greedy

pytestmark = pytest.mark.engine

LAYERS, HIDDEN, KV_HEADS, HEAD_DIM, ELT = 6, 128, 2, 32, 4
SS = {"token_budget": 1024, "page_size": 16}
OFFLOAD = dict(SS, offload=True, host_kv_gib=0.05, hbm_cache_gib=0.01)
KW = dict(max_model_len=1024, max_num_batched_tokens=64, max_num_seqs=4)
LENGTHS = (20, 300, 40, 500)  # two short prompts decode while the two long ones prefill


def prompts(seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in LENGTHS]


def delta(before, after):
    return {k: after[k] - before[k] for k in stats.COUNTER_NAMES}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_same_tokens_as_plain_prefill_with_decodes_in_the_same_steps(tiny_model, family, monkeypatch, tmp_path):
    model = tiny_model(family, num_layers=LAYERS)
    copies = []
    if family == "llama":  # the prompts' whole blocks as one copy per run of ids (qwen2: the tiny blocks of 64 KiB
        monkeypatch.setattr(flash_d2h, "MIN_COPY_BYTES", 0)  # are below the default, so all go through the ring)
        copy_runs = flash_d2h.FlashD2HSaver._copy_runs
        monkeypatch.setattr(flash_d2h.FlashD2HSaver, "_copy_runs",
                            lambda self, *a: (copies.append(len(a[2])), copy_runs(self, *a)))
        # The worker in this process (it sees the patches), its counters alone in a fresh directory, a fresh gauge.
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        stats.ensure_stats_dir()  # the session's directory exists first, so the one below is undone to it
        monkeypatch.setenv(stats.ENV_DIR, str(tmp_path))
        monkeypatch.setitem(stats.process_counters().values, "segment_peak_bytes", 0)
    # Plain prefill: every prompt in one step, KV in HBM.
    with engine(model, "sparseserve", SS, max_model_len=1024, max_num_batched_tokens=1024) as llm:
        reference = greedy(llm, prompts(), max_tokens=24)
    before = stats.read_totals()
    with engine(model, "sparseserve", OFFLOAD, **KW) as llm:
        got = greedy(llm, prompts(), max_tokens=24)
        time.sleep(1.2)  # the workers publish their counters twice a second
        after = stats.read_totals()
    assert all(len(set(t)) >= 3 for t in reference), reference  # a real continuation
    assert got == reference
    assert len(copies) >= (LAYERS * 2 if family == "llama" else 0), copies  # each prompt's blocks, every layer
    d = delta(before, after)
    # Each long prompt, its last token too, through every layer, exactly once; the step that ran each last token took
    # its attention output from the prefill in every layer (no context reloaded).
    assert d["segment_token_layers"] == LAYERS * (300 + 500), d
    assert d["segment_last_token_layers"] == LAYERS * 2, d
    # 300 tokens run one whole layer a step (6 steps); 500 > 384 runs chunks (8 steps); both take several steps,
    # and the short requests decoded in most of them.
    assert d["segment_steps"] >= 12 and d["segment_steps_with_decodes"] >= 8, d
    # The most a prefill held: hidden states and residual of its tokens plus ONE layer's KV of its prompt.
    n = 500
    one_layer_kv = n * KV_HEADS * 2 * HEAD_DIM * ELT
    assert after["segment_peak_bytes"] == 2 * n * HIDDEN * ELT + one_layer_kv, after
    assert one_layer_kv * LAYERS > after["segment_peak_bytes"]


def test_last_tokens_of_equal_length_in_one_step_reload_their_context(tiny_model, monkeypatch):
    """Two prompts of one length whose prefills end in the same step: their last tokens run in one step, and a
    one-token row cannot be told apart by its length, so both reload their context from host DRAM (same tokens)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # both requests reach the scheduler before its first step
    model = tiny_model("llama", num_layers=LAYERS)
    rng = random.Random(2)
    pair = [[rng.randrange(3, 500) for _ in range(300)] for _ in range(2)]
    with engine(model, "sparseserve", SS, max_model_len=1024, max_num_batched_tokens=1024) as llm:
        reference = greedy(llm, pair, max_tokens=8)
    before = stats.read_totals()
    with engine(model, "sparseserve", dict(OFFLOAD, max_inject_tokens=2 * 300 * LAYERS), **KW) as llm:
        got = greedy(llm, pair, max_tokens=8)
        time.sleep(1.2)
        d = delta(before, stats.read_totals())
    assert got == reference
    assert d["segment_token_layers"] == 2 * 300 * LAYERS and d["segment_steps"] == 1, d
    assert d["segment_last_token_layers"] == 0, d


def check_page_metadata(full_pages: int) -> None:
    """The engine runs in this process: every page metadata row the prefill wrote equals the metadata of that page's
    KV in host DRAM, and it wrote one row per full page of the prompt, KV head and layer."""
    import torch

    import sparseserve_vllm.adapter.runtime as runtime
    from sparseserve_vllm.kernels import build_page_metadata

    rt = runtime._RUNTIME
    rt.tier.saver.wait_all()
    for layer in range(LAYERS):
        meta = rt.page_meta(layer, rt.tier.cache_pages)[:-1]  # offload: the last row is the trash row
        written = (meta.abs().flatten(1).sum(1) > 0).nonzero().flatten()
        assert written.numel() == full_pages * KV_HEADS, (layer, written.numel())
        expect = torch.zeros_like(meta)
        build_page_metadata(rt.tier.host.pages(layer, SS["page_size"]), expect, written, selector=rt.cfg.selector)
        torch.testing.assert_close(meta[written], expect[written])


def test_the_prompt_kv_bypasses_the_hbm_cache_and_an_aborted_prefill_frees_its_blocks(tiny_model, monkeypatch):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from sparseserve_vllm.core.flash_d2h import FlashD2HSaver

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: one step per step()
    parts = []  # tokens of each part FlashD2H stages
    stage = FlashD2HSaver._save_piece
    monkeypatch.setattr(FlashD2HSaver, "_save_piece",
                        lambda saver, layer, k, v, slots: parts.append(slots.numel()) or stage(saver, layer, k, v, slots))
    model = tiny_model("llama", num_layers=LAYERS)
    long_prompt = prompts(1)[3]
    before = stats.read_totals()
    with engine(model, "sparseserve", OFFLOAD, **KW) as llm:
        greedy(llm, [long_prompt], max_tokens=1)
        time.sleep(1.2)
        one = delta(before, stats.read_totals())
        # A unit's save is staged whole (one scatter), not cut at the step's token budget.
        assert max(parts) == min(LAYERS * KW["max_num_batched_tokens"], len(long_prompt) - 1), (max(parts), len(long_prompt))
        # Only the prompt's last token went through the HBM page cache: its page, once per layer and KV head
        # (chunked prefill makes every page of the prompt resident in every layer), and only that page came back
        # from host DRAM (the last token's attention was kept from the prefill, no context reloaded).
        assert one["segment_token_layers"] == LAYERS * len(long_prompt)
        assert one["hbm_misses"] + one["hbm_hits"] <= LAYERS * KV_HEADS, one
        page_bytes = SS["page_size"] * 2 * HEAD_DIM * ELT
        assert one["segment_last_token_layers"] == LAYERS, one
        assert one["bytes_h2d"] <= LAYERS * KV_HEADS * page_bytes, one
        check_page_metadata(full_pages=(len(long_prompt) - 1) // SS["page_size"])
        # A request for prompt log-probabilities needs logits of every prompt token: vLLM's chunked prefill runs it.
        out = llm.generate([TokensPrompt(prompt_token_ids=long_prompt)],
                           SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
        assert len(out.prompt_logprobs) == len(long_prompt) and out.prompt_logprobs[-1]
        time.sleep(1.2)
        assert stats.read_totals()["segment_token_layers"] - before["segment_token_layers"] == one["segment_token_layers"]

        eng = llm.llm_engine
        eng.add_request("aborted", TokensPrompt(prompt_token_ids=long_prompt),
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        for _ in range(3):
            assert not [o for o in eng.step() if o.outputs and o.outputs[0].token_ids]  # still prefilling
        time.sleep(1.2)
        mid = stats.read_totals()
        assert mid["host_blocks_in_use"] > 0 and mid["segment_steps"] > before["segment_steps"] + one["segment_steps"]
        after = abort_and_drain(eng, "aborted")
    assert after["host_blocks_in_use"] == 0 and after["hbm_pages_in_use"] == 0, after
