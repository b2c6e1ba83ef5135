"""Layer-segmented prefill (paper section 2.7) on vLLM 0.26, through the KV connector's asynchronous-load path.

How it fits vLLM (no model or runner override):
- Scheduler side (`SparseServeConnector`): a new request whose prompt is longer than the step token budget
  (`max_num_batched_tokens`) is answered by `get_num_new_matched_tokens` with "its first `num_tokens - 1` tokens
  arrive asynchronously". vLLM allocates its (host DRAM) blocks, parks it in `WAITING_FOR_REMOTE_KVS` and keeps
  scheduling the other requests; the job (`SegmentJobSpec`: token ids and block ids) reaches the workers with the
  step's connector metadata.
- Worker side (`SegmentedPrefill.step`, called from the connector's `get_finished` after every step's forward, and
  in the steps vLLM runs without a forward): the step's budget (`max_inject_tokens` token x layer units,
  `core.segment_plan`) runs the jobs' next units, each one decoder layer of the model over a range of the prompt's
  tokens, called directly with a forward context whose attention metadata for that layer is a `SegmentMetadata`.
  The SparseServe impl then attends causally over the layer's KV of the prompt held in the job's one-layer
  scratch, writes the page metadata of the pages that filled, and saves the new KV to host DRAM with FlashD2H.
  Between steps the job keeps the hidden states and residual of every prompt token, so decodes of other requests
  run through all layers in the same engine steps (hybrid batching).
- A job runs every prompt token through every layer, the last one too, but saves the KV of all but the last (vLLM
  has allocated blocks for those only). When its last layer is done the worker reports it in `finished_recving`;
  vLLM moves the request back to WAITING with `num_tokens - 1` computed tokens and schedules its last prompt token
  like any other, which samples the first output token. The job keeps that token's attention output of every layer
  (`SegmentJob.last`, [layers, heads, head dim]); the step that runs the token (named by the scheduler in
  `last_token_reqs`) uses it instead of reloading the whole prompt's KV of every layer from host DRAM
  (`SparseRuntime.segment_last`, keyed by the request's length; the impl takes it only for a one-token prefill row
  of that length that is alone of its kind in the step, and reloads otherwise).
- HBM held by a job: its hidden states and residual (2 x tokens x hidden size) and ONE layer's KV of its prompt
  (tokens x KV heads x 2 x head dim); nothing in the HBM page cache. Only the oldest unfinished jobs hold buffers
  (they are made at a job's first unit and freed at its last).
- A request that finishes (is aborted) during its prefill is dropped and reported finished, so vLLM frees its blocks.
- Supported models: those whose inner model runs `hidden, residual = layer(positions, hidden, residual)` over
  `embed_input_ids` exactly as vLLM's `LlamaModel` and `Qwen2Model` do (`SEGMENTED_ARCHITECTURES`).
- Statistics: `segment_token_layers`, `segment_steps`, `segment_steps_with_decodes`, `segment_last_token_layers`,
  `dense_tokens` (counters) and `segment_peak_bytes` (gauge: the most bytes one job's buffers held).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparseserve_vllm.core.segment_plan import SegmentProgress, plan_step

SEGMENTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass
class SegmentJobSpec:
    """Scheduler -> workers: a prompt to prefill layer by layer (all its tokens; the last one's KV is not saved)."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]


@dataclass
class SegmentMetadata:
    """Attention metadata of one unit: `job`'s tokens `[start, end)` in the layer being called."""

    job: "SegmentJob"
    start: int
    end: int


@dataclass
class SegmentJob:
    spec: SegmentJobSpec
    progress: SegmentProgress
    hidden: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    host_slots: torch.Tensor | None = None  # [n - 1] logical slot of every prompt token but the last
    block_ids: torch.Tensor | None = None
    k: torch.Tensor | None = None  # [n, Hkv, D]: the KV of the layer being run
    v: torch.Tensor | None = None
    last: torch.Tensor | None = None  # [layers, heads, head dim]: the last token's attention output of each layer
    buffers: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.progress.num_tokens

    @property
    def num_saved(self) -> int:
        """Tokens whose KV goes to host DRAM: all but the last (vLLM writes that one's KV when it runs it)."""
        return self.progress.num_tokens - 1

    def keep_last(self, layer: int, out: torch.Tensor) -> None:
        """Keep the last token's attention output `out` ([heads, head dim]) of `layer`."""
        if self.last is None:
            self.last = torch.empty((self.progress.num_layers, *out.shape), dtype=out.dtype, device=out.device)
        self.last[layer] = out

    def start(self, embed, block_size: int, device: torch.device) -> None:
        n = self.num_tokens
        ids = torch.tensor(self.spec.token_ids, dtype=torch.long, device=device)
        self.hidden = embed(ids)
        self.residual = torch.empty_like(self.hidden)
        self.positions = torch.arange(n, dtype=torch.long, device=device)
        self.block_ids = torch.tensor(self.spec.block_ids, dtype=torch.long, device=device)
        saved = self.positions[: self.num_saved]
        self.host_slots = self.block_ids[saved // block_size] * block_size + saved % block_size
        self.buffers = [self.hidden, self.residual]

    def scratch(self, num_kv_heads: int, head_size: int, dtype: torch.dtype, device: torch.device):
        """The one-layer KV scratch `(k, v)`, made by the first layer's attention."""
        if self.k is None:
            self.k = torch.empty((self.num_tokens, num_kv_heads, head_size), dtype=dtype, device=device)
            self.v = torch.empty_like(self.k)
            self.buffers += [self.k, self.v]
        return self.k, self.v

    def filled_pages(self, start: int, end: int, page_size: int, ppb: int, num_kv_heads: int):
        """Pages that tokens `[start, end)` complete: `(first, last)` page indices and their flat page ids
        `[pages, Hkv]` (block * Hkv + head) * ppb + page in block."""
        p0, p1 = start // page_size, end // page_size
        if p1 <= p0:
            return p0, p1, None
        p = torch.arange(p0, p1, device=self.block_ids.device)
        heads = torch.arange(num_kv_heads, device=p.device)
        flat = (self.block_ids[p // ppb][:, None] * num_kv_heads + heads[None, :]) * ppb + (p % ppb)[:, None]
        return p0, p1, flat

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers)

    def release(self) -> None:
        self.hidden = self.residual = self.positions = self.host_slots = self.block_ids = self.k = self.v = None
        self.last = None
        self.buffers = []


class _ModelView:
    """The decoder layers of a supported model and the attention layer name inside each."""

    def __init__(self, model: torch.nn.Module) -> None:
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.models.llama import LlamaModel
        from vllm.model_executor.models.qwen2 import Qwen2Model

        inner = getattr(model, "model", None)
        if inner is None or type(inner).forward not in (LlamaModel.forward, Qwen2Model.forward):
            raise NotImplementedError(
                f"sparseserve: layer-segmented prefill supports {', '.join(SEGMENTED_ARCHITECTURES)}, not "
                f"{type(model).__name__}; set layer_segmented_prefill to false"
            )
        self.embed = inner.embed_input_ids
        self.layers = list(inner.layers)
        self.attn_names = []
        for layer in self.layers:
            names = [m.layer_name for m in layer.modules() if isinstance(m, Attention)]
            if len(names) != 1:
                raise NotImplementedError(f"sparseserve: a decoder layer with {len(names)} attention layers")
            self.attn_names.append(names[0])


class SegmentedPrefill:
    """Worker side: the jobs in arrival order and the step that advances them (see the module docstring)."""

    def __init__(self, runtime, vllm_config) -> None:
        self.rt = runtime
        self.vllm_config = vllm_config
        self.jobs: dict[str, SegmentJob] = {}
        # finished jobs' (length, last-token attention outputs), until the step that runs that token
        self.last: dict[str, tuple[int, torch.Tensor]] = {}
        self._last_reqs: list[str] = []  # the requests whose last token this step runs
        self._view: _ModelView | None = None
        self._device: torch.device | None = None

    def _model(self) -> _ModelView:
        if self._view is None:
            if self.rt.model is None:
                raise RuntimeError("sparseserve: layer-segmented prefill found no model (the model loader patch did "
                                   "not see it load)")
            self._view = _ModelView(self.rt.model)
            self._device = next(self.rt.model.parameters()).device
        return self._view

    def add(self, specs: list[SegmentJobSpec]) -> None:
        if specs:
            layers = len(self._model().layers)
            for spec in specs:
                self.jobs[spec.req_id] = SegmentJob(spec, SegmentProgress(len(spec.token_ids), layers))

    def bind_step(self, last_token_reqs: list[str]) -> None:
        """Before the step's forward: offer the kept attention outputs of the requests whose last prompt token it runs
        (`rt.segment_last`, by request length; lengths shared by two such requests are left out)."""
        self._last_reqs = last_token_reqs
        by_len: dict[int, torch.Tensor | None] = {}
        for req_id in last_token_reqs:
            if req_id in self.last:
                n, out = self.last[req_id]
                by_len[n] = None if n in by_len else out
        self.rt.segment_last = {n: out for n, out in by_len.items() if out is not None}

    def step(self, finished_req_ids) -> set[str]:
        """Drop finished requests' jobs, run this step's units; the request ids whose prefill ended."""
        self.rt.segment_last = {}
        for req_id in self._last_reqs:  # their last token ran in this step's forward
            self.last.pop(req_id, None)
        self._last_reqs = []
        done = set()
        for req_id in finished_req_ids or ():
            self.last.pop(req_id, None)
            job = self.jobs.pop(req_id, None)
            if job is not None:
                job.release()
                done.add(req_id)
        with_decodes, self.rt.step_decodes = self.rt.step_decodes, 0
        if not self.jobs:
            return done
        view = self._model()
        jobs = list(self.jobs.values())
        plan = plan_step([j.progress for j in jobs], self.rt.segment_per_step)
        counters = self.rt.counters.values
        with torch.inference_mode():
            for i, layer, start, end in plan:
                self._run(view, jobs[i], layer, start, end)
                counters["segment_peak_bytes"] = max(counters["segment_peak_bytes"], jobs[i].nbytes)
        work = sum(end - start for _, _, start, end in plan)
        # the last prompt token's query counts where vLLM runs it (a prefill row, which takes the kept output)
        dense = sum(max(min(end, jobs[i].num_saved) - start, 0) for i, _, start, end in plan)
        self.rt.count(segment_token_layers=work, dense_tokens=dense, segment_steps=1,
                      segment_steps_with_decodes=int(with_decodes > 0))
        for job in jobs:
            if job.progress.done:
                if job.last is not None:
                    self.last[job.spec.req_id] = (job.num_tokens, job.last)
                job.release()
                del self.jobs[job.spec.req_id]
                done.add(job.spec.req_id)
        return done

    def _run(self, view: _ModelView, job: SegmentJob, layer: int, start: int, end: int) -> None:
        from vllm.forward_context import set_forward_context

        if job.hidden is None:
            job.start(view.embed, self.rt.block_size, self._device)
        md = SegmentMetadata(job=job, start=start, end=end)
        with set_forward_context({view.attn_names[layer]: md}, self.vllm_config):
            hidden, residual = view.layers[layer](
                job.positions[start:end], job.hidden[start:end], None if layer == 0 else job.residual[start:end]
            )
        # The first layer returns its input as the residual (updated in place): copy it before the hidden states.
        job.residual[start:end].copy_(residual)
        job.hidden[start:end].copy_(hidden)
