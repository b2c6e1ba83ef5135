"""`SparseRuntime`: it is per engine (copies and `with_hf_config` views of an engine's config keep its runtime, another
engine's config does not, and a replaced runtime's statistics thread ends), and it reports each decode request's
working set in bytes."""

import threading
import time
from types import SimpleNamespace

import torch

from sparseserve_vllm.adapter.runtime import SparseRuntime
from sparseserve_vllm.config import SparseServeConfig


def stub_config(instance_id: str, cache_config) -> SimpleNamespace:
    """The fields a runtime reads from a `VllmConfig` (no attention backend selected: no layer-segmented prefill)."""
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=64),
                           attention_config=SimpleNamespace(backend=None), instance_id=instance_id,
                           cache_config=cache_config)


def stats_threads() -> int:
    return sum(t.name == "sparseserve-stats" and t.is_alive() for t in threading.enumerate())


def test_a_runtime_serves_copies_and_views_of_its_engine_config_only():
    cache = SimpleNamespace()
    before = stats_threads()
    rt = SparseRuntime(SparseServeConfig(stats_interval_s=0), stub_config("1001", cache))
    assert stats_threads() == before + 1
    assert rt.serves(stub_config("1001", SimpleNamespace()))  # a pickled or deep copy: same instance_id
    assert rt.serves(stub_config("2002", cache))  # with_hf_config: new instance_id, the same sub-configs
    assert not rt.serves(stub_config("3003", SimpleNamespace()))  # another engine
    rt.stop()
    deadline = time.monotonic() + 5
    while stats_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats_threads() == before


def test_runtime_reports_each_decode_requests_working_set_in_bytes():
    cfg = SparseServeConfig(token_budget=128, page_size=16, offload=True, host_kv_gib=1, hbm_cache_gib=1,
                            working_set_window=2, stats_interval_s=0)
    rt = SparseRuntime(cfg, stub_config("test", None))
    hkv, d = 2, 8
    rt.bind_geometry(block_size=32, num_kv_heads=hkv, head_size=d, num_layers=3)  # 2 pages per block
    rt.set_logical_blocks(10)
    rt.tier_for(torch.zeros(6, hkv, 32, 2 * d, dtype=torch.float16))
    page = 16 * 2 * d * 2  # page_size x 2 x head_dim x float16

    def flat(block, j):  # KV head 0's page j of `block`; head 1's is 2 further
        return (block * hkv) * 2 + j

    # Request A owns blocks 4, 7 and 40 tokens (pages a0 a1 a2), B owns block 2 and 20 tokens (b0 b1); B's row
    # holds a stale 7 where it has no block.
    a0, a1, a2, b0, b1 = flat(4, 0), flat(4, 1), flat(7, 0), flat(2, 0), flat(2, 1)
    table, lens = torch.tensor([[4, 7], [2, 7]], dtype=torch.int32), torch.tensor([40, 20])

    def step(selections):
        """One decode step: `selections[layer]` = [A's pages, B's pages] (None: padding), the same for both heads."""
        rt.note_decode_rows(table, lens, selects=bool(selections))
        for layer, rows in selections.items():
            ids = torch.tensor([[-1 if p is None else p for p in row] for row in rows]).view(2, 1, -1).repeat(1, hkv, 1)
            valid = ids >= 0
            ids[:, 1] += 2
            # Padding entries carry an owned page id with length 0: only the length marks them invalid.
            slots = torch.where(valid, ids, a2).to(torch.int32)
            rt.record_selection(layer, slots, valid.to(torch.int32) * 16)
        return rt.working_set_report()

    # Step 1: A selects a0, a1 in layer 0 and a2 in layer 2; B selects b0 in layer 0 and b0, b1 in layer 2.
    rep = step({0: [[a0, a1], [b0, None]], 2: [[a2, None], [b0, b1]]})
    assert rep == {4: 3 * hkv * page, 2: 3 * hkv * page}, rep
    # Step 2: A selects a0 again (no new distinct page), B nothing; with window 2, step 1 still counts.
    rep = step({0: [[a0, None], [None, None]]})
    assert rep == {4: 3 * hkv * page, 2: 3 * hkv * page}, rep
    # A step without sparse decode selections closes no decode step.
    assert step({}) == rep
    # Step 3 ages step 1 out: A keeps a0 of layer 0 (step 2) and a0 of layer 1 (step 3); B has nothing left.
    rep = step({1: [[a0, None], [None, None]]})
    assert rep == {4: 2 * hkv * page}, rep
    # Freed blocks are forgotten; nothing to report without decode rows.
    rt.free_blocks([4])
    assert step({}) == {}
    assert rt.working_set_report() == {}
    rt.tier.close()
    rt.tier = None  # the runtime's daemon publish thread reads the tier's counters; none to read at exit
