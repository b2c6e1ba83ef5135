"""`SparseRuntime`: it is per engine (copies and `with_hf_config` views of an engine's config keep its runtime, another
engine's config does not, and a replaced runtime's statistics thread ends), and it reports each decode request's
working set in bytes, one step late (without a host sync), tagged with the step it describes, so that the scheduler's
`StepOwners` credits it to the request that held the block then, never to a later owner. Its decode wrapper takes the
configured selector and GQA reduction."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from sparseserve_vllm.adapter.runtime import SparseRuntime
from sparseserve_vllm.adapter.scheduler import StepOwners
from sparseserve_vllm.config import SparseServeConfig
from tests.host_sync import allow_lagged_reads, forbid_host_sync


def stub_config(instance_id: str, cache_config) -> SimpleNamespace:
    """The fields a runtime reads from a `VllmConfig` (no attention backend selected: no layer-segmented prefill)."""
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=64, max_num_seqs=2),
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


HKV, D = 2, 8
PAGE = 16 * 2 * D * 2  # page_size x 2 x head_dim x float16


def offload_runtime() -> SparseRuntime:
    """An offload runtime on the CPU: 3 layers, blocks of 32 tokens (2 pages of 16), 10 logical blocks."""
    cfg = SparseServeConfig(token_budget=128, page_size=16, offload=True, host_kv_gib=1, hbm_cache_gib=1,
                            working_set_window=2, stats_interval_s=0)
    rt = SparseRuntime(cfg, stub_config("test", None))
    rt.bind_geometry(block_size=32, num_kv_heads=HKV, head_size=D, num_layers=3)
    rt.set_logical_blocks(10)
    rt.tier_for(torch.zeros(6, HKV, 32, 2 * D, dtype=torch.float16))
    return rt


def close(rt: SparseRuntime) -> None:
    rt.tier.close()
    rt.tier = None  # the runtime's daemon publish thread reads the tier's counters; none to read at exit


def flat(block, j):  # KV head 0's page j of `block`; head 1's is 2 further
    return (block * HKV) * 2 + j


def test_runtime_reports_each_decode_requests_working_set_in_bytes_one_step_late():
    rt = offload_runtime()
    hkv, page = HKV, PAGE

    # Request A owns blocks 4, 7 and 40 tokens (pages a0 a1 a2), B owns block 2 and 20 tokens (b0 b1); B's row
    # holds a stale 7 where it has no block.
    a0, a1, a2, b0, b1 = flat(4, 0), flat(4, 1), flat(7, 0), flat(2, 0), flat(2, 1)
    table, lens = torch.tensor([[4, 7], [2, 7]], dtype=torch.int32), torch.tensor([40, 20])

    def step(number, selections):
        """Decode step `number`: `selections[layer]` = [A's pages, B's pages] (None: padding), the same for both
        heads; returns the report the step's output carries."""
        rt.note_decode_rows(table, lens, selects=bool(selections))
        record(rt, selections)
        return rt.working_set_report(number)

    # Step 1: A selects a0, a1 in layer 0 and a2 in layer 2; B selects b0 in layer 0 and b0, b1 in layer 2. Its report
    # comes with the next step's output.
    assert step(1, {0: [[a0, a1], [b0, None]], 2: [[a2, None], [b0, b1]]}) is None
    # Step 2: A selects a0 again (no new distinct page), B nothing; with window 2, step 1 still counts.
    assert step(2, {0: [[a0, None], [None, None]]}) == (1, {4: 3 * hkv * page, 2: 3 * hkv * page})
    # Step 3 has no sparse decode selections: it closes no decode step.
    assert step(3, {}) == (2, {4: 3 * hkv * page, 2: 3 * hkv * page})
    # Step 4 ages step 1 out: A keeps a0 of layer 0 (step 2) and a0 of layer 1 (step 4); B has nothing left.
    assert step(4, {1: [[a0, None], [None, None]]}) == (3, {4: 3 * hkv * page, 2: 3 * hkv * page})
    # Block 4 is freed before step 5: the report about step 4 still says what A's working set was then (the
    # scheduler credits it through step 4's owners); the selections of block 4's pages are forgotten from step 5 on.
    rt.free_blocks([4])
    assert step(5, {}) == (4, {4: 2 * hkv * page})
    # A step without decode rows snapshots nothing: it reads the pending report (step 5's: nothing selected).
    assert rt.working_set_report(6) is None
    assert rt.working_set_report(7) is None
    close(rt)


def record(rt, selections):
    """`selections[layer]` = [request 0's pages, request 1's pages] (None: padding), recorded for both KV heads."""
    for layer, rows in selections.items():
        ids = torch.tensor([[-1 if p is None else p for p in row] for row in rows]).view(2, 1, -1).repeat(1, HKV, 1)
        valid = ids >= 0
        ids[:, 1] += 2
        rt.record_selection(layer, torch.where(valid, ids, -1))


def test_a_finished_requests_late_report_is_never_credited_to_the_new_owner_of_its_block():
    """Request A (first block 4) decodes in step 5 and finishes; B gets block 4 in step 6. The report carried by step
    6's output describes step 5: the scheduler's step owners credit it to A (which it then drops, A being gone), not
    to B; B's own working set comes with step 7's output. No report reads device values."""
    rt, owners = offload_runtime(), StepOwners()
    table = torch.tensor([[4, 7], [2, 0]], dtype=torch.int32)
    lens = torch.tensor([40, 20])
    a0, a1, b0 = flat(4, 0), flat(4, 1), flat(2, 0)

    def step(number, who, pages):
        owners.note(number, {4: who, 2: "C"})  # the scheduler's map of the step: first block -> request
        rt.note_decode_rows(table, lens, selects=True)
        with pytest.MonkeyPatch.context() as mp:
            forbid_host_sync(mp)
            allow_lagged_reads(mp)
            record(rt, {0: [pages, [b0, None]]})
            report = rt.working_set_report(number)
        return None if report is None else owners.credit(*report)

    assert step(5, "A", [a0, a1]) is None
    rt.free_blocks([4, 7])  # A finished; its blocks are freed before step 6, and B's first block is 4
    assert step(6, "B", [a0, None]) == {"A": 2 * HKV * PAGE, "C": HKV * PAGE}
    assert step(7, "B", [a0, None]) == {"B": HKV * PAGE, "C": HKV * PAGE}
    close(rt)


@pytest.mark.parametrize("selector, setting, expected", [("mean", None, "mass"), ("cuboid_mean", None, "sum"),
                                                         ("quest", None, "zmax"), ("quest", "max", "max"),
                                                         ("mean", "sum", "sum")])
def test_the_decode_wrapper_combines_a_gqa_group_as_configured(selector, setting, expected):
    rt = SparseRuntime(SparseServeConfig(selector=selector, gqa_reduce=setting, stats_interval_s=0),
                       stub_config("gqa", None))
    rt.bind_geometry(block_size=64, num_kv_heads=HKV, head_size=D, num_layers=3)
    w = rt.make_wrapper(num_qo_heads=2 * HKV, dtype=torch.float32, device=torch.device("cpu"), max_batch=2,
                        max_pages=8)
    assert (w.selector, w.gqa_reduce) == (selector, expected)
    rt.stop()
