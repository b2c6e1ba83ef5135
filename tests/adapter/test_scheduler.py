"""Working-set-aware batch control (`adapter/scheduler.py`); the runtime's own report is in `test_runtime.py`.

- `plan_step`, the scheduler's decision, on hand-made candidates;
- `WorkingSetScheduler(...)` picks the async variant; offload selects it and refuses another `--scheduler-cls`;
- the scheduler's gauges are written at most every `PUBLISH_INTERVAL_S` while steps run, at once when it idles;
- the workers' reports aggregate by summing (disjoint KV heads); `StepOwners` credits a report to the requests that
  held its blocks in the step it describes (with the runtime's late report: `test_runtime.py`);
- end to end on real vLLM (CPU build, tiny llama): an HBM cache that holds fewer decode working sets than there are
  requests caps the batch and parks requests, every request completes, nothing is recomputed, and the greedy tokens
  equal the same run without offload.
"""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import pytest

from sparseserve_vllm import stats
from sparseserve_vllm.adapter.connector import SparseServeWorkerMetadata
from sparseserve_vllm.adapter.scheduler import (
    AsyncWorkingSetScheduler,
    Candidate,
    StepOwners,
    WorkingSetScheduler,
    plan_step,
)
from sparseserve_vllm.config import SparseServeConfigError
from sparseserve_vllm.core.admission import WorkingSetController
from tests.conftest import engine, greedy


# ---------------- the decision ----------------
def dec(rid, nbytes):
    return Candidate(rid, nbytes, False)


def pre(rid, nbytes):
    return Candidate(rid, nbytes, True)


def test_prefill_need_is_reserved_before_the_decodes_and_the_rest_is_parked():
    running = [dec("a", 40), pre("p", 30), dec("b", 20), dec("c", 10), dec("d", 5)]
    plan = plan_step(running, [1], 100, WorkingSetController())
    assert plan.prefill_bytes == 30
    # 70 left for the decodes: a, b, c make 70 and run; d would make 75 and is parked.
    assert plan.decision.admitted == ("a", "b", "c") and plan.parked == ("d",)
    assert plan.admit_waiting == 0  # nothing is admitted while a request is parked


def test_the_oldest_decode_runs_even_when_the_prefills_take_the_whole_cache():
    plan = plan_step([pre("p", 90), dec("a", 50), dec("b", 1)], [], 100, WorkingSetController())
    assert plan.decision.admitted == ("a",) and plan.parked == ("b",) and plan.decision.overcommitted


def test_waiting_requests_are_admitted_while_their_prefill_fits():
    running = [dec("a", 30), pre("p", 10)]
    assert plan_step(running, [20, 30, 5], 100, WorkingSetController()).admit_waiting == 3  # 40 + 55 <= 100
    assert plan_step(running, [20, 45, 5], 100, WorkingSetController()).admit_waiting == 1  # 40 + 20 + 45 > 100
    assert plan_step(running, [61, 1], 100, WorkingSetController()).admit_waiting == 0  # FCFS: the head blocks
    # With nothing running, the first waiting request is admitted whatever its size.
    assert plan_step([], [500, 1], 100, WorkingSetController()).admit_waiting == 1
    assert plan_step([], [40, 50, 20], 100, WorkingSetController()).admit_waiting == 2


def test_layer_segmented_prefills_are_admitted_even_while_decodes_are_parked():
    """None marks a waiting request whose layer-segmented prefill holds no HBM cache pages: it is admitted when the
    cache is full and requests are parked, but the FCFS prefix still stops at the first request that does not fit."""
    running = [dec("a", 60), dec("b", 60)]
    plan = plan_step(running, [None, None, 5, None], 100, WorkingSetController())
    assert plan.parked == ("b",)
    assert plan.admit_waiting == 2  # the two segmented prefills; the 5-byte chunk waits (a request is parked)
    plan = plan_step([dec("a", 60)], [None, 30, None, 20], 100, WorkingSetController())
    assert plan.admit_waiting == 3  # 30 fits in 40, the next 20 does not fit in the 10 left


def test_no_request_starves():
    """Requests that finish after a few steps: every one runs eventually, in FCFS order of first run."""
    controller = WorkingSetController()
    left = {f"r{i}": 3 for i in range(6)}
    size = {f"r{i}": 40 + 10 * (i % 3) for i in range(6)}
    first_run = []
    for _ in range(100):
        if not left:
            break
        plan = plan_step([dec(r, size[r]) for r in left], [], 100, controller)
        for r in plan.decision.admitted:
            if r not in first_run:
                first_run.append(r)
            left[r] -= 1
            if not left[r]:
                del left[r]
    assert not left and first_run == [f"r{i}" for i in range(6)]


def test_bad_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity_bytes"):
        plan_step([], [], -1, WorkingSetController())


# ---------------- selection of the class, configuration ----------------
def test_the_async_variant_is_picked_under_async_scheduling():
    for flag, cls in ((True, AsyncWorkingSetScheduler), (False, WorkingSetScheduler)):
        cfg = SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=flag))
        assert type(WorkingSetScheduler.__new__(WorkingSetScheduler, vllm_config=cfg)) is cls
        assert type(WorkingSetScheduler.__new__(WorkingSetScheduler, cfg)) is cls


def _offload_config(model, **kw):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=model, attention_backend="sparseserve", dtype="float32", max_model_len=2048,
                additional_config={"sparseserve": {"offload": True, "host_kv_gib": 1, "hbm_cache_gib": 0.1}})
    args.update(kw)
    return EngineArgs(**args).create_engine_config()


def test_offload_selects_the_scheduler_and_refuses_another(tiny_model):
    cfg = _offload_config(tiny_model())
    assert cfg.scheduler_config.get_scheduler_cls() is WorkingSetScheduler
    assert _offload_config(tiny_model(), scheduler_cls=AsyncWorkingSetScheduler).scheduler_config.scheduler_cls \
        is AsyncWorkingSetScheduler
    with pytest.raises(SparseServeConfigError, match="--scheduler-cls selects vllm.v1.core.sched.scheduler.Scheduler"):
        _offload_config(tiny_model(), scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler")


def test_worker_reports_aggregate_by_summing():
    a = SparseServeWorkerMetadata(step=3, ws_bytes={7: 100, 9: 5})
    b = SparseServeWorkerMetadata(step=3, ws_bytes={7: 20, 11: 1})
    assert a.aggregate(b) == SparseServeWorkerMetadata(step=3, ws_bytes={7: 120, 9: 5, 11: 1})


def test_step_owners_credit_a_report_through_the_step_it_describes():
    owners = StepOwners(kept=3)
    owners.note(5, {4: "A", 9: "C"})
    owners.note(6, {4: "B", 9: "C"})  # A finished after step 5; B got its first block
    owners.note(7, {4: "B"})
    # The report about step 5 arrives (with step 6's output, or later under async scheduling): A's, never B's.
    assert owners.credit(5, {4: 100, 9: 7, 11: 1}) == {"A": 100, "C": 7}  # block 11: nobody's in step 5
    assert owners.credit(5, {4: 100}) == {}  # step 5's map is used once
    assert owners.credit(7, {4: 30}) == {"B": 30}  # step 6's report never came: step 6 is dropped with it
    assert owners.credit(6, {4: 20}) == {}
    for step in range(8, 12):
        owners.note(step, {4: f"r{step}"})
    assert owners.credit(8, {4: 1}) == {}  # only the last 3 steps are kept
    assert owners.credit(10, {4: 1}) == {"r10": 1}


def test_the_scheduler_gauges_are_written_at_most_every_interval_and_at_once_when_forced(tiny_model, monkeypatch):
    """`publish_usage` (every step) writes the statistics file only when a value changed, and while steps run at
    most every `PUBLISH_INTERVAL_S`; `force` (the scheduler going idle) writes a change at once."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.core.block_pool import BlockPool

    from sparseserve_vllm.adapter import connector

    conn = connector.SparseServeConnector(_offload_config(tiny_model()), KVConnectorRole.SCHEDULER)
    pool = BlockPool(num_gpu_blocks=10, enable_caching=False, hash_block_size=16)
    conn.bind_gpu_block_pool(pool)
    written = []
    monkeypatch.setattr(connector.stats, "publish", lambda counters: written.append(counters.values["host_blocks_in_use"]))
    monkeypatch.setattr(connector, "PUBLISH_INTERVAL_S", 1e9)
    conn.publish_usage()
    assert written == [0]  # the first call writes
    blocks = pool.get_new_blocks(3)
    conn.publish_usage()
    assert written == [0]  # changed, but within the interval
    monkeypatch.setattr(connector, "PUBLISH_INTERVAL_S", 0.0)
    conn.publish_usage()
    assert written == [0, 3]  # the interval passed
    conn.publish_usage(force=True)
    assert written == [0, 3]  # nothing changed
    monkeypatch.setattr(connector, "PUBLISH_INTERVAL_S", 1e9)
    pool.free_blocks(blocks)
    conn.publish_usage(force=True)
    assert written == [0, 3, 0]  # forced: at once


# ---------------- end to end ----------------
SS = {"token_budget": 512, "page_size": 16}
KW = dict(max_model_len=1024, max_num_batched_tokens=128)
PROMPT_LEN, NUM_REQUESTS, MAX_TOKENS = 310, 4, 24
# tiny llama: 2 layers, 2 KV heads, head_dim 32, float32 -> a page of 16 tokens is 4 KiB and a 128-token block of
# one layer holds 16 pages. A decode working set (the budget covers the context) is 2 x 2 x ceil(context / 16)
# pages: 80 pages up to 320 tokens, 84 beyond. 15 blocks = 240 pages hold three such requests, then two.
HBM_PAGES = 240
OFFLOAD = dict(SS, offload=True, host_kv_gib=0.05, hbm_cache_gib=HBM_PAGES / 16 * 64 / 2**20)


@pytest.mark.engine
def test_working_set_caps_the_batch_parks_requests_and_keeps_the_tokens(tiny_model):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(PROMPT_LEN)] for _ in range(NUM_REQUESTS)]
    with engine(tiny_model(), "sparseserve", SS, **KW) as llm:
        reference = greedy(llm, prompts, max_tokens=MAX_TOKENS)

    got, seen, before, after = run_watched(tiny_model(), OFFLOAD, prompts)
    assert all(len(set(t)) >= 3 for t in reference), reference  # a real continuation, not one repeated token
    assert got == reference  # every request completed, with the same tokens
    caps = {cap for cap, _ in seen if cap}
    assert caps and max(caps) < NUM_REQUESTS, seen
    assert 2 in caps, seen  # the working sets grew past 320 tokens: two requests ran, the third was parked
    assert max(ws for _, ws in seen) <= HBM_PAGES * 4096, seen
    assert after["parked_steps"] > before["parked_steps"], after
    assert after["batch_cap"] == 0 and after["working_set_bytes"] == 0, after  # idle again
    # Parked requests were never recomputed: prefill attended exactly the prompts, once, in each of the 2 layers.
    assert after["dense_tokens"] - before["dense_tokens"] == NUM_REQUESTS * PROMPT_LEN * 2
    controlled_loads = (after["hbm_misses"] - before["hbm_misses"]) / (after["decode_steps"] - before["decode_steps"])

    # batch_control false: vLLM's own admission; all requests decode together, the cache thrashes, same tokens.
    got, seen, before, after = run_watched(tiny_model(), dict(OFFLOAD, batch_control=False), prompts)
    assert got == reference
    assert max(cap for cap, _ in seen) == NUM_REQUESTS, seen
    assert after["parked_steps"] == before["parked_steps"], after
    uncontrolled_loads = (after["hbm_misses"] - before["hbm_misses"]) / (after["decode_steps"] - before["decode_steps"])
    assert uncontrolled_loads > 2 * controlled_loads, (uncontrolled_loads, controlled_loads)


def run_watched(model, sparseserve, prompts):
    """Greedy tokens of an offload engine, the (batch_cap, working_set_bytes) gauges seen while it ran, and the
    statistics totals before and after."""
    before = stats.read_totals()
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            t = stats.read_totals()
            seen.append((t["batch_cap"], t["working_set_bytes"]))
            time.sleep(0.01)

    with engine(model, "sparseserve", sparseserve, **KW) as llm:
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            got = greedy(llm, prompts, max_tokens=MAX_TOKENS)
        finally:
            done.set()
            watcher.join()
        time.sleep(1.2)  # the workers publish their counters twice a second
        after = stats.read_totals()
    return got, seen, before, after
