"""`WorkingSetScheduler`: vLLM's scheduler with SparseServe's working-set-aware batch control (paper section 3.3,
Algorithm 1) for `offload` mode, where vLLM's blocks are host DRAM and each worker holds only an HBM page cache.

Contract:
- Selected with `--scheduler-cls sparseserve_vllm.adapter.scheduler.WorkingSetScheduler` (the plugin sets it itself
  when `offload` is on, see `patches/engine_args.py`). vLLM calls it with `Scheduler`'s constructor arguments;
  `WorkingSetScheduler(...)` returns an `AsyncWorkingSetScheduler` (the same logic on vLLM's `AsyncScheduler`)
  when `scheduler_config.async_scheduling` is on. Without `offload` (or without the SparseServe connector) it is
  vLLM's scheduler unchanged.
- Each step, before vLLM's own `schedule()`, `plan_step` decides in arrival order (vLLM's `running` order):
    * running requests still prefilling always run; their exact HBM need this step is the pages their new tokens
      are written into, in ONE layer (`prefill_pages` of the span `start % page_size + chunk`, layer-segmented):
      offload runs a chunk layer by layer, writes its new tokens through into the HBM cache where they are
      protected only while their layer runs, and reads the earlier context from host DRAM into a scratch buffer;
    * running decode requests are admitted by `WorkingSetController` (FCFS prefix, the first always) into the HBM
      cache minus that prefill need; a request's estimate is its last reported working set (the workers' union of
      selected (layer, page) over the last `working_set_window` decode steps, in bytes) or, without a report,
      `decode_budget_pages` x page bytes for its context;
    * the other decode requests are parked for this step: hidden from `self.running` while vLLM schedules and put
      back afterwards at their places; they keep their blocks (KV stays in host DRAM) and are never recomputed;
    * waiting requests are admitted as an FCFS prefix: a request that starts, runs or has just finished a
      layer-segmented prefill always (it holds no HBM cache pages, `adapter/segmented_prefill.py`; its last
      prompt token then needs one page per layer and KV head, and from then on it is a decode request like the
      others); any other only while no request is parked and its first chunk's exact prefill need fits in what is
      left (the first one always when nothing runs). vLLM sees only that prefix (the other waiting requests are
      hidden from its queues for the step) and `max_num_running_reqs` is lowered to what it admits.
  Every request completes: the head of the running queue always runs, and the others move up as it finishes.
- Working sets arrive from the workers through the connector (`SparseServeWorkerMetadata`: `{first block id:
  bytes}` and the number of the step they describe, which is the step BEFORE the one whose output carries them:
  the workers read them one step late, without a host sync). `StepOwners` maps each first block id back to the
  request it belonged to in that step, so a report is never credited to a later owner of the block (async
  scheduling included), and a report about a request that has finished since is dropped. So the newest estimate
  describes the step before the last one whose output the scheduler has taken. A parked request keeps its last
  report.
- Requests that vLLM itself preempts (host blocks exhausted) have their blocks announced to the workers, which
  drop their cache slots and working-set history.
- Statistics (`sparseserve_vllm.stats`, this process's counters, published by the connector each step):
  `working_set_bytes` (sum of the estimates of the decode requests let run), `batch_cap` (how many; both 0 once
  nothing runs), `parked_steps` (request-steps parked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sparseserve_vllm.adapter.logging import logger as plugin_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler

from sparseserve_vllm.adapter.config_access import sparseserve_config
from sparseserve_vllm.core.admission import AdmissionDecision, WorkingSetController
from sparseserve_vllm.core.working_set import decode_budget_pages, page_bytes, prefill_pages

logger = plugin_logger(__name__)

__all__ = ["AsyncWorkingSetScheduler", "Candidate", "StepOwners", "StepPlan", "WorkingSetScheduler", "plan_step"]

# Steps whose first-block -> request maps wait for their report (async scheduling keeps 2 steps in flight, and a
# report comes with the output of the step after the one it describes).
_KEPT_STEP_MAPS = 8


@dataclass(frozen=True)
class Candidate:
    request_id: str
    nbytes: int
    """Decode: the working-set estimate; prefill: the exact HBM need of this step's chunk."""
    prefill: bool


@dataclass(frozen=True)
class StepPlan:
    decision: AdmissionDecision
    """The decode requests' admission (`admitted` run, `rejected` are parked)."""
    prefill_bytes: int
    """HBM the running prefills need this step (reserved before the decodes)."""
    admit_waiting: int
    """Waiting requests vLLM may admit this step (0 while any request is parked)."""

    @property
    def parked(self) -> tuple[str, ...]:
        return self.decision.rejected


def plan_step(
    running: Sequence[Candidate],
    waiting_bytes: Sequence[int | None],
    capacity_bytes: int,
    controller: WorkingSetController,
) -> StepPlan:
    """One step's working-set decision (see the module docstring); `running` in arrival order, `waiting_bytes` the
    exact prefill need of each waiting request's first chunk, in the order vLLM would admit them (None: a request
    whose layer-segmented prefill needs no HBM cache, admitted whatever the cache holds)."""
    if capacity_bytes < 0:
        raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
    prefill = sum(c.nbytes for c in running if c.prefill)
    decision = controller.admit([(c.request_id, c.nbytes) for c in running if not c.prefill],
                                max(capacity_bytes - prefill, 0))
    admit = 0
    free = capacity_bytes - prefill - decision.used_bytes
    for need in waiting_bytes:
        if need is not None:
            if decision.rejected or ((running or admit) and need > free):
                break
            free -= need
        admit += 1
    return StepPlan(decision=decision, prefill_bytes=prefill, admit_waiting=admit)


class StepOwners:
    """The first block id -> request id map of each of the last `kept` steps (`note`), to credit a working-set
    report, keyed by first block id and tagged with the step it describes, to the requests it is about (`credit`)."""

    def __init__(self, kept: int = _KEPT_STEP_MAPS) -> None:
        self._kept = kept
        self._steps: dict[int, dict[int, str]] = {}  # step -> {first block id: request id}, oldest first

    def note(self, step: int, owners: dict[int, str]) -> None:
        self._steps[step] = owners
        while len(self._steps) > self._kept:
            del self._steps[next(iter(self._steps))]

    def credit(self, step: int, ws_bytes: dict[int, int]) -> dict[str, int]:
        """`{request id: bytes}` of a report about `step`, through the owners noted for that step (a block nobody
        held then, or a step no longer kept, credits nobody). Reports come oldest first: that step's map and the
        older ones are dropped."""
        owners = self._steps.pop(step, {})
        for older in [s for s in self._steps if s < step]:
            del self._steps[older]
        return {owners[block]: nbytes for block, nbytes in ws_bytes.items() if block in owners}


class WorkingSetScheduler(Scheduler):
    def __new__(cls, *args, **kwargs):
        if cls is WorkingSetScheduler:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if vllm_config is not None and vllm_config.scheduler_config.async_scheduling:
                cls = AsyncWorkingSetScheduler
        return super().__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from sparseserve_vllm.adapter.connector import SparseServeConnector

        cfg = sparseserve_config(self.vllm_config)
        self._ws_on = cfg.offload and isinstance(self.connector, SparseServeConnector)
        if not self._ws_on:
            return
        group = self.kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        self._cfg = cfg
        self._num_layers = len(group.layer_names)
        self._num_kv_heads = spec.num_kv_heads
        self._page_bytes = page_bytes(page_size=cfg.page_size, head_dim=spec.head_size,
                                      element_size=spec.dtype.itemsize)
        # Tensor parallel: every worker holds its own KV heads' page pool and reports its own working sets, which
        # the connector sums; capacity and estimates are summed over the workers likewise.
        self._workers = self.vllm_config.parallel_config.world_size
        self._capacity = self._workers * sum(t.size for t in self.kv_cache_config.kv_cache_tensors)
        self._controller = WorkingSetController()
        self._ws_bytes: dict[str, int] = {}  # request id -> last reported working set
        self._first_block: dict[str, int] = {}
        self._owners = StepOwners()
        self._counters = self.connector.counters
        logger.info(
            "SparseServe working-set batch control: HBM page cache %.1f MiB over all workers (%d pages of %d bytes), "
            "window %d steps",
            self._capacity / 2**20, self._capacity // self._page_bytes, self._page_bytes, cfg.working_set_window,
        )

    # ---------------- estimates ----------------
    def _prefill_bytes(self, start: int, tokens: int) -> int:
        # The offload tier runs a prefill chunk one layer at a time: its pages are written through into the cache
        # and protected only while their layer runs (the context itself is gathered into a scratch buffer), so the
        # cache must hold one layer's new pages of the chunk.
        span = start % self._cfg.page_size + tokens if tokens else 0
        return self._workers * self._page_bytes * prefill_pages(num_layers=self._num_layers, num_kv_heads=self._num_kv_heads,
                                                prompt_tokens=span, page_size=self._cfg.page_size,
                                                layer_segmented=True)

    def _budget_bytes(self, context_len: int) -> int:
        sparse_layers = self._num_layers - self._cfg.dense_layers  # dense layers read host DRAM, not the cache
        if sparse_layers <= 0:
            return 0
        return self._workers * self._page_bytes * decode_budget_pages(
            num_layers=sparse_layers, num_kv_heads=self._num_kv_heads, token_budget=self._cfg.token_budget,
            context_len=context_len, page_size=self._cfg.page_size,
        )

    def _waiting_in_order(self):
        if self.policy == SchedulingPolicy.PRIORITY:
            return sorted([*self.skipped_waiting, *self.waiting])
        return [*self.skipped_waiting, *self.waiting]

    def _plan(self) -> StepPlan:
        budget = self.max_num_scheduled_tokens
        threshold = self.scheduler_config.long_prefill_token_threshold
        running: list[Candidate] = []
        for req in self.running:
            new_tokens = req.num_tokens_with_spec + req.num_output_placeholders - req.num_computed_tokens
            if new_tokens > 1:
                n = min(new_tokens, budget, threshold if threshold > 0 else new_tokens)
                budget -= n
                running.append(Candidate(req.request_id, self._prefill_bytes(req.num_computed_tokens, n), True))
            else:
                budget -= min(budget, new_tokens)
                ws = self._ws_bytes.get(req.request_id) or self._budget_bytes(req.num_computed_tokens + 1)
                running.append(Candidate(req.request_id, ws, False))
        waiting: list[int | None] = []
        slots = self.max_num_running_reqs - len(self.running) - self.num_waiting_for_streaming_input
        for req in self._waiting_in_order():
            if self._segmenting(req):
                waiting.append(None)
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget, threshold if threshold > 0 else budget)
            if n <= 0 or slots <= 0:
                break
            budget -= n
            slots -= 1
            waiting.append(self._prefill_bytes(req.num_computed_tokens, n))
        # batch_control false: every running decode request fits (vLLM's own admission; the cache may thrash).
        capacity = self._capacity if self._cfg.batch_control else 2**62
        return plan_step(running, waiting, capacity, self._controller)

    def _segmenting(self, req) -> bool:
        """Is this waiting request one that layer-segmented prefill takes or took (it holds no HBM cache pages until
        it runs; once its prefill ended, its last prompt token writes one page per layer and KV head)."""
        return req.request_id in self.connector.segmented_requests or self.connector.segment_tokens(req) > 0

    # ---------------- reports from the workers ----------------
    def _absorb_reports(self) -> None:
        for report in self.connector.take_working_set_reports():
            for request_id, nbytes in self._owners.credit(report.step, report.ws_bytes).items():
                if request_id in self.requests:  # not finished since the step the report describes
                    self._ws_bytes[request_id] = nbytes
        for cache in (self._ws_bytes, self._first_block):
            for request_id in [r for r in cache if r not in self.requests]:
                del cache[request_id]

    def _note_step(self, scheduler_output) -> None:
        owners = {}
        for request_id in scheduler_output.num_scheduled_tokens:
            block = self._first_block.get(request_id)
            if block is None:
                block = self._first_block[request_id] = self.kv_cache_manager.get_block_ids(request_id)[0][0]
            owners[block] = request_id
        self._owners.note(scheduler_output.kv_connector_metadata.step, owners)

    # ---------------- vLLM hooks ----------------
    def schedule(self, *args, **kwargs):
        if not self._ws_on:
            return super().schedule(*args, **kwargs)
        self._absorb_reports()
        plan = self._plan()
        values = self._counters.values
        values["working_set_bytes"] = plan.decision.used_bytes
        values["batch_cap"] = plan.decision.cap
        values["parked_steps"] += len(plan.parked)
        original = self.running
        parked = set(plan.parked)
        saved_max = self.max_num_running_reqs
        if parked:
            self.running = [r for r in original if r.request_id not in parked]
        # Waiting requests past the admitted prefix are hidden from vLLM for this step (a layer-segmented prefill
        # takes no running slot, so a count alone would let vLLM admit past it).
        held = self._waiting_in_order()[plan.admit_waiting:]
        skipped = {id(r) for r in self.skipped_waiting}
        held_queues = [(self.skipped_waiting, [r for r in held if id(r) in skipped]),
                       (self.waiting, [r for r in held if id(r) not in skipped])]
        for queue, requests in held_queues:
            queue.remove_requests(requests)
        room = len(self.running) + self.num_waiting_for_streaming_input + plan.admit_waiting  # as vLLM counts
        self.max_num_running_reqs = min(saved_max, room)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            for queue, requests in held_queues:
                for request in requests:
                    queue.add_request(request)
            self.max_num_running_reqs = saved_max
            if parked:
                # Parked requests go back to their places; vLLM's preemptions (gone) and admissions (appended) stay.
                now = {r.request_id for r in self.running}
                before = {r.request_id for r in original}
                self.running = [r for r in original if r.request_id in parked or r.request_id in now] + [
                    r for r in self.running if r.request_id not in before
                ]
        self._note_step(output)
        return output

    def update_from_output(self, *args, **kwargs):
        outputs = super().update_from_output(*args, **kwargs)
        if self._ws_on and not self.running:
            # Idle: no step will publish again until the next request; the gauges describe no batch now, and the
            # blocks of requests that ended in this output (a finished layer-segmented prefill's) are free.
            self._counters.values["batch_cap"] = self._counters.values["working_set_bytes"] = 0
            self.connector.publish_usage(force=True)
        return outputs

    def _preempt_request(self, request, timestamp: float) -> None:
        if self._ws_on:
            self.connector.free_later(self.kv_cache_manager.get_block_ids(request.request_id)[0])
            self._ws_bytes.pop(request.request_id, None)
            self._first_block.pop(request.request_id, None)
        super()._preempt_request(request, timestamp)


class AsyncWorkingSetScheduler(WorkingSetScheduler, AsyncScheduler):
    """`WorkingSetScheduler` on vLLM's `AsyncScheduler` (what `WorkingSetScheduler(...)` gives under async
    scheduling)."""
