"""`SparseServeConnector`: the KV-connector channel between vLLM's scheduler and SparseServe's workers (offload).

vLLM has no other per-step channel from the scheduler to an attention backend; SparseServe uses this one when
`offload` is on (the plugin configures it itself, see `patches/engine_args.py`). It moves no KV by itself:
- scheduler side: `request_finished` (and `free_later`, for requests the scheduler preempts) collects the block ids
  of freed requests; each step's `SparseServeConnectorMetadata` carries them to the workers with the step's number
  (`step`, counted from 0); `bind_gpu_block_pool` gives the logical (host) block pool, whose usage is published as
  host pages in use; `update_connector_output` keeps the workers' working-set reports until the scheduler takes
  them (`take_working_set_reports`);
- layer-segmented prefill (`adapter/segmented_prefill.py`): on the scheduler side `get_num_new_matched_tokens`
  answers "all but the last token arrive asynchronously" for a new request whose prompt is longer than
  `max_num_batched_tokens` (`segment_tokens`), `update_state_after_alloc` records the job (token and block ids)
  and the step's metadata carries the new jobs (`segment_jobs`) and the requests whose last prompt token the step
  runs (`last_token_reqs`); on the worker side `start_load_kv` offers those requests' kept attention outputs to
  the forward, and `get_finished` runs the step's prefill units and returns the requests whose prefill ended (and
  the finished requests whose jobs it dropped) as `finished_recving`;
- worker side: hands the logical block count (`kv_cache_config.num_blocks`) to the worker's runtime, frees the
  finished requests' HBM cache slots and working-set history at the start of each step, and after the forward
  reports, as `SparseServeWorkerMetadata`, the working set in bytes of each decode request of the PREVIOUS step
  (read one step late, without a host sync), keyed by the request's first block id and tagged with that previous
  step's number, which the scheduler needs to map the block ids to requests (see `SparseRuntime.working_set_report`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from sparseserve_vllm import stats
from sparseserve_vllm.adapter.config_access import segmented_prefill_on
from sparseserve_vllm.adapter.segmented_prefill import SegmentedPrefill, SegmentJobSpec


PUBLISH_INTERVAL_S = 0.1  # the scheduler's gauges, written at most this often while steps run (see publish_usage)


@dataclass
class SparseServeConnectorMetadata(KVConnectorMetadata):
    freed_block_ids: list[int] = field(default_factory=list)
    step: int = 0
    segment_jobs: list[SegmentJobSpec] = field(default_factory=list)
    last_token_reqs: list[str] = field(default_factory=list)


@dataclass
class SparseServeWorkerMetadata(KVConnectorWorkerMetadata):
    """Working sets of one step's decode requests: `{first block id: bytes}` (requests without history left out).
    `step` is the number of the step they describe, the one before the step whose output carries them."""

    step: int
    ws_bytes: dict[int, int]

    def aggregate(self, other: "SparseServeWorkerMetadata") -> "SparseServeWorkerMetadata":
        # Workers of one step hold disjoint KV heads: a request's working set is the sum of theirs.
        merged = dict(self.ws_bytes)
        for block, nbytes in other.ws_bytes.items():
            merged[block] = merged.get(block, 0) + nbytes
        return SparseServeWorkerMetadata(step=self.step, ws_bytes=merged)


class SparseServeConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._freed: list[int] = []
        self._block_pool = None
        self._published: tuple[dict[str, int], float] = ({}, -float("inf"))  # values and time of the last write
        self._step = 0
        self._ws_reports: list[SparseServeWorkerMetadata] = []
        self.counters = stats.process_counters()
        self._runtime = None
        self._segmented = segmented_prefill_on(vllm_config)
        self._segment_above = vllm_config.scheduler_config.max_num_batched_tokens
        self._new_jobs: list[SegmentJobSpec] = []
        self.segmented_requests: set[str] = set()  # scheduler side: requests given to layer-segmented prefill
        self._awaiting_last: set[str] = set()  # scheduler side: of those, the ones whose last prompt token has not run
        self._segments: SegmentedPrefill | None = None
        if role == KVConnectorRole.WORKER:
            from sparseserve_vllm.adapter.runtime import get_runtime

            self._runtime = get_runtime(vllm_config)
            if kv_cache_config is not None:
                self._runtime.set_logical_blocks(kv_cache_config.num_blocks)
            if self._segmented:
                self._segments = SegmentedPrefill(self._runtime, vllm_config)

    # ---------------- scheduler side ----------------
    def bind_gpu_block_pool(self, gpu_block_pool) -> None:
        self._block_pool = gpu_block_pool

    def segment_tokens(self, request, num_computed_tokens: int = 0) -> int:
        """Tokens of a new request that layer-segmented prefill computes (all but the last), or 0. Requests that need
        more than token ids through the layers are left to chunked prefill: prompt log-probabilities (the skipped
        tokens would have no logits), prompt embeddings, multimodal inputs and pooling."""
        if not self._segmented or request.num_computed_tokens or num_computed_tokens:
            return 0
        sp = request.sampling_params
        if (sp is None or sp.prompt_logprobs is not None or request.prompt_embeds is not None or request.mm_features
                or request.pooling_params is not None):
            return 0
        n = request.num_tokens - 1
        return n if n > self._segment_above else 0

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        n = self.segment_tokens(request, num_computed_tokens)
        return n, n > 0

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens:
            self.segmented_requests.add(request.request_id)
            self._awaiting_last.add(request.request_id)
            self._new_jobs.append(SegmentJobSpec(
                req_id=request.request_id, token_ids=list(request.all_token_ids[:num_external_tokens + 1]),
                block_ids=list(blocks.get_block_ids()[0]),
            ))

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        self.segmented_requests.discard(request.request_id)
        self._awaiting_last.discard(request.request_id)
        self.free_later(block_ids)
        return False, None

    def free_later(self, block_ids) -> None:
        """Tell the workers, with the next step, that these blocks were freed."""
        self._freed.extend(block_ids)

    def build_connector_meta(self, scheduler_output) -> SparseServeConnectorMetadata:
        last = [r for r in scheduler_output.num_scheduled_tokens if r in self._awaiting_last]
        self._awaiting_last.difference_update(last)
        meta = SparseServeConnectorMetadata(freed_block_ids=self._freed, step=self._step, segment_jobs=self._new_jobs,
                                            last_token_reqs=last)
        self._freed, self._new_jobs = [], []
        self._step += 1
        self.publish_usage()
        return meta

    def publish_usage(self, *, force: bool = False) -> None:
        """Publish the host blocks in use with the scheduler's other gauges: a file write, so while steps run only
        when a value changed and at most every `PUBLISH_INTERVAL_S`; with `force` (the scheduler, when a step leaves
        nothing running) whenever a value changed."""
        if self._block_pool is not None:
            pool = self._block_pool
            used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # block 0 is vLLM's null block
            values = self.counters.values
            values["host_blocks_in_use"] = max(used, 0)
            last, at = self._published
            now = time.monotonic()
            if values != last and (force or now - at >= PUBLISH_INTERVAL_S):
                stats.publish(self.counters)
                self._published = (dict(values), now)

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, SparseServeWorkerMetadata):
            self._ws_reports.append(meta)

    def take_working_set_reports(self) -> list[SparseServeWorkerMetadata]:
        """The workers' working-set reports received since the last call, oldest first."""
        reports, self._ws_reports = self._ws_reports, []
        return reports

    # ---------------- worker side ----------------
    def start_load_kv(self, forward_context, **kwargs) -> None:
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if meta.freed_block_ids:
                self._runtime.free_blocks(meta.freed_block_ids)
            if self._segments is not None:
                self._segments.bind_step(meta.last_token_reqs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._segments is None:
            return None, None
        if self.has_connector_metadata():
            self._segments.add(self._get_connector_metadata().segment_jobs)
        done = self._segments.step(finished_req_ids)
        return None, (done or None)

    def build_connector_worker_meta(self) -> SparseServeWorkerMetadata | None:
        if not self.has_connector_metadata():
            return None
        report = self._runtime.working_set_report(self._get_connector_metadata().step)
        if report is None:
            return None
        step, ws_bytes = report
        return SparseServeWorkerMetadata(step=step, ws_bytes=ws_bytes)
