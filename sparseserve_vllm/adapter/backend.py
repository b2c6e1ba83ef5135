"""`SparseServeBackend`: vLLM attention backend with dynamic sparse decode attention (DSA).

Contract:
- Registered in `AttentionBackendEnum.CUSTOM` (user-facing name `sparseserve`); `get_name()` is "CUSTOM".
- KV cache per layer: logical and physical `(num_blocks, num_kv_heads, block_size, 2*head_size)` (HND, K then V in
  the last dim), the same logical shape as vLLM's FLASH_ATTN and CPU_ATTN, so one KV head's page of `page_size`
  tokens is one contiguous chunk.
- The backend writes K/V itself inside `forward()` (`forward_includes_kv_cache_update = True`).
- Batches are reordered decode-first (`reorder_batch_threshold = 1`). Decode rows of sparse layers run
  score -> top-k (per KV head) -> attend over the chosen pages; prefill rows and the first `dense_layers` layers
  run dense attention: vLLM's FlashAttention (FA3 on Hopper) on CUDA, `kernels.paged_dense_torch` on CPU.
- CUDA graphs: UNIFORM_SINGLE_TOKEN_DECODE: pure decode batches run inside vLLM's full CUDA graphs (the builder
  keeps every per-step input in persistent buffers (vLLM's, and a -1 padded buffer of the pages to summarize), the
  runtime's wrapper is planned once for the largest batch and context, and padded rows (seq_len 0, slot -1) attend
  to nothing); other batches run under piecewise graphs. With offload too: the builder does the step's host work
  (`SparseRuntime.begin_step`: saves made visible, counters snapshotted and deferred page-cache errors raised one
  step late, both without a host sync, new eviction ring, working-set rows) and counts the statistics, since no
  impl Python runs at a replay; the impls' decode-only path is sync-free and keeps all changing state on the
  device. vLLM builds the metadata of a capture run (`build_for_cudagraph_capture`) before it begins capturing the
  forward, so `begin_step`'s snapshot copy and CUDA event are never recorded into a graph. Offload with
  `dense_layers` > 0: NEVER (dense layers gather each request's context on the host), so piecewise graphs with
  eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
    MultipleOf,
)


class SparseServeBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return max(default_block_size, 128)

    @staticmethod
    def get_impl_cls():
        from sparseserve_vllm.adapter.impl import SparseServeImpl

        return SparseServeImpl

    @staticmethod
    def get_builder_cls():
        return SparseServeMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        if include_num_layers_dimension:
            return (1, 2, 0, 3, 4)
        return (0, 1, 2, 3)

    @classmethod
    def get_required_kv_cache_layout(cls):
        return "HND"

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 8 == 0 and 32 <= head_size <= 256

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


@dataclass
class SparseServeMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor
    # Decode rows (the first num_decodes requests, one query token each).
    num_decodes: int
    decode_seq_lens: torch.Tensor
    decode_block_table: torch.Tensor
    # Prefill rows (the rest of the batch): query_start_loc relative to the first prefill token.
    num_prefills: int
    num_decode_tokens: int
    prefill_query_start_loc_cpu: torch.Tensor
    prefill_seq_lens_cpu: torch.Tensor
    prefill_block_table: torch.Tensor
    # Whole batch, for dense layers on CPU.
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    block_table: torch.Tensor
    # Flat page slots (all KV heads) of the pages this step fills: their metadata is written after the KV write.
    # -1 entries are padding (a fixed-size persistent buffer for decode-only batches on CUDA).
    summarize_slots: torch.Tensor
    # vLLM FlashAttention metadata (CUDA only): prefill rows, and the whole batch for dense layers.
    fa_prefill: Any = None
    fa_all: Any = None


def split_decodes(cm: CommonAttentionMetadata) -> tuple[int, int]:
    """(num_decodes, num_decode_tokens): the leading rows with one query token that are not prompt chunks.

    Rows from the first prefill on (query length > 1, or flagged `is_prefilling`) are prefills. Padded rows of a
    full-CUDA-graph batch (query length 0, beyond `is_prefilling`'s length) count as decodes.
    """
    qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1]
    qlens = qsl[1:] - qsl[:-1]
    is_prefill = qlens > 1
    if cm.is_prefilling is not None:
        n = min(cm.is_prefilling.shape[0], cm.num_reqs)
        is_prefill[:n] |= cm.is_prefilling[:n].to(torch.bool) & (qlens[:n] > 0)
    if not bool(is_prefill.any()):
        return cm.num_reqs, cm.num_actual_tokens
    first = int(is_prefill.to(torch.int8).argmax())
    return first, int(qsl[first])


class SparseServeMetadataBuilder(AttentionMetadataBuilder[SparseServeMetadata]):
    reorder_batch_threshold: int | None = 1

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        from sparseserve_vllm.adapter.config_access import sparseserve_config

        cfg = sparseserve_config(vllm_config)
        if cfg.offload and cfg.dense_layers:
            return AttentionCGSupport.NEVER
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from sparseserve_vllm.adapter.runtime import get_runtime

        rt = self.runtime = get_runtime(vllm_config)
        rt.bind_geometry(
            block_size=kv_cache_spec.block_size,
            num_kv_heads=kv_cache_spec.num_kv_heads,
            head_size=kv_cache_spec.head_size,
            num_layers=len(layer_names),
        )
        self.num_sparse_layers = len(layer_names) - rt.cfg.dense_layers
        sched, comp = vllm_config.scheduler_config, vllm_config.compilation_config
        max_batch = max(sched.max_num_seqs, comp.max_cudagraph_capture_size or 0)
        max_pages = -(-vllm_config.model_config.max_model_len // rt.cfg.page_size)
        rt.make_wrapper(
            num_qo_heads=vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config),
            dtype=kv_cache_spec.dtype, device=device, max_batch=max_batch, max_pages=max_pages,
        )
        # Decode-only batches: each request completes at most one page per KV head per step.
        self._num_kv_heads = kv_cache_spec.num_kv_heads
        self._decode_summaries = torch.full((max_batch * kv_cache_spec.num_kv_heads,), -1, dtype=torch.long,
                                            device=device)
        # Full CUDA graphs may replay decode-only batches: then their page summaries go through the persistent -1
        # padded buffer (every layer summarizes num_reqs x Hkv entries, mostly padding). Eager engines (and steps
        # without full graphs) get only the pages that really fill, usually none (one step in page_size).
        mode = vllm_config.compilation_config.cudagraph_mode
        self._full_graphs = device.type == "cuda" and mode is not None and mode.has_full_cudagraphs()
        self._capturing = False
        self._fa_builder = None
        if device.type == "cuda":
            from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

            self._fa_builder = FlashAttentionMetadataBuilder(kv_cache_spec, layer_names, vllm_config, device)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> SparseServeMetadata:
        self._capturing = True
        try:
            return self.build(0, common_attn_metadata)
        finally:
            self._capturing = False

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False, **kwargs) -> SparseServeMetadata:
        cm, rt = common_attn_metadata, self.runtime
        nd, ndt = (cm.num_reqs, cm.num_actual_tokens) if self._capturing else split_decodes(cm)
        npf = cm.num_reqs - nd
        qsl_cpu = cm.query_start_loc_cpu[: cm.num_reqs + 1]
        seq_lens_cpu = (
            cm.seq_lens_cpu_upper_bound[: cm.num_reqs]
            if cm.seq_lens_cpu_upper_bound is not None
            else cm.seq_lens[: cm.num_reqs].cpu()
        )
        summarize = rt.filled_page_slots(qsl_cpu, seq_lens_cpu, cm.block_table_tensor)
        if not self._capturing:
            rt.step_decodes = nd
            self._count(nd, ndt, cm.num_actual_tokens, seq_lens_cpu[:nd], summarize.numel())
        # Full CUDA graphs may replay any batch of one-token rows (vLLM's uniform decode ignores `is_prefilling`, so a
        # prompt's last token after a prefix-cache hit rides along as a decode): its summaries go to the graph's buffer.
        if cm.max_query_len <= 1 and self.device.type == "cuda" and (self._full_graphs or self._capturing):
            summarize = self._persistent_summaries(summarize, cm.num_reqs)
        if rt.cfg.offload:
            rt.begin_step(cm.block_table_tensor[:nd], seq_lens_cpu[:nd], selects=nd > 0 and self.num_sparse_layers > 0)
        md = SparseServeMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            slot_mapping=cm.slot_mapping,
            num_decodes=nd,
            decode_seq_lens=cm.seq_lens[:nd],
            decode_block_table=cm.block_table_tensor[:nd],
            num_prefills=npf,
            num_decode_tokens=ndt,
            prefill_query_start_loc_cpu=qsl_cpu[nd:] - ndt,
            prefill_seq_lens_cpu=seq_lens_cpu[nd:],
            prefill_block_table=cm.block_table_tensor[nd : cm.num_reqs],
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=seq_lens_cpu,
            block_table=cm.block_table_tensor[: cm.num_reqs],
            summarize_slots=summarize,
        )
        if self._fa_builder is not None:
            if rt.cfg.dense_layers:
                md.fa_all = (self._fa_builder.build_for_cudagraph_capture(cm) if self._capturing
                             else self._fa_builder.build(common_prefix_len, cm, fast_build))
            if npf:
                from vllm.v1.worker.ubatch_utils import UBatchSlice, _make_metadata_with_slice

                sliced = _make_metadata_with_slice(
                    UBatchSlice(slice(nd, cm.num_reqs), slice(ndt, cm.num_actual_tokens)), cm
                )
                md.fa_prefill = self._fa_builder.build(0, sliced, fast_build)
        return md

    def _persistent_summaries(self, summarize: torch.Tensor, num_reqs: int) -> torch.Tensor:
        """`summarize` copied into the persistent buffer, -1 padded; the first `num_reqs * Hkv` entries are handed
        out (a decode-only batch of `num_reqs` (padded) rows fills at most that many pages), so a graph captured
        for `num_reqs` rows reads the same slice at every replay."""
        self._decode_summaries[summarize.numel():].fill_(-1)
        self._decode_summaries[: summarize.numel()].copy_(summarize)
        return self._decode_summaries[: num_reqs * self._num_kv_heads]

    def _count(self, nd: int, ndt: int, num_tokens: int, decode_lens_cpu: torch.Tensor, summarized: int) -> None:
        """Statistics of the step (host side, so they count steps that replay a CUDA graph too)."""
        rt, layers, sparse = self.runtime, self.runtime.num_layers, self.num_sparse_layers
        amounts = {"pages_summarized": summarized * layers,
                   "dense_tokens": (num_tokens - ndt) * layers + ndt * rt.cfg.dense_layers}
        if nd and sparse:
            scored, selected, attended = rt.decode_counts(decode_lens_cpu)
            amounts.update(decode_steps=sparse, decode_queries=int((decode_lens_cpu > 0).sum()) * sparse, pages_scored=scored * sparse,
                           pages_selected=selected * sparse, tokens_attended=attended * sparse)
        rt.count(**amounts)
