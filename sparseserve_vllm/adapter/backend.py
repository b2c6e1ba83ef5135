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
- CUDA graphs: NEVER is declared (vLLM then uses PIECEWISE graphs and runs attention eagerly).
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
from vllm.v1.attention.backends.utils import split_decodes_and_prefills


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
    # Host-side counts of one sparse decode layer-step (for statistics; no device sync).
    pages_scored: int
    pages_selected: int
    tokens_attended: int
    # Flat page slots (all KV heads) of the pages this step fills: their metadata is written after the KV write.
    summarize_slots: torch.Tensor
    # vLLM FlashAttention metadata (CUDA only): prefill rows, and the whole batch for dense layers.
    fa_prefill: Any = None
    fa_all: Any = None


class SparseServeMetadataBuilder(AttentionMetadataBuilder[SparseServeMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from sparseserve_vllm.adapter.runtime import get_runtime

        self.runtime = get_runtime(vllm_config)
        self.runtime.bind_geometry(
            block_size=kv_cache_spec.block_size,
            num_kv_heads=kv_cache_spec.num_kv_heads,
            head_size=kv_cache_spec.head_size,
            num_layers=len(layer_names),
        )
        self._fa_builder = None
        if device.type == "cuda":
            from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

            self._fa_builder = FlashAttentionMetadataBuilder(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False, **kwargs) -> SparseServeMetadata:
        cm = common_attn_metadata
        nd, npf, ndt, _ = split_decodes_and_prefills(
            cm, decode_threshold=1, treat_short_extends_as_decodes=cm.is_prefilling is None
        )
        qsl_cpu = cm.query_start_loc_cpu[: cm.num_reqs + 1]
        seq_lens_cpu = (
            cm.seq_lens_cpu_upper_bound[: cm.num_reqs]
            if cm.seq_lens_cpu_upper_bound is not None
            else cm.seq_lens[: cm.num_reqs].cpu()
        )
        scored, selected, attended = self.runtime.decode_counts(seq_lens_cpu[:nd])
        self.runtime.plan_decode(nd, cm.block_table_tensor.shape[1])
        if self.runtime.cfg.offload:
            self.runtime.note_decode_rows(cm.block_table_tensor[:nd], seq_lens_cpu[:nd])
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
            pages_scored=scored,
            pages_selected=selected,
            tokens_attended=attended,
            summarize_slots=self.runtime.filled_page_slots(qsl_cpu, seq_lens_cpu, cm.block_table_tensor),
        )
        if self._fa_builder is not None:
            md.fa_all = self._fa_builder.build(common_prefix_len, cm, fast_build)
            if npf:
                from vllm.v1.worker.ubatch_utils import UBatchSlice, _make_metadata_with_slice

                sliced = _make_metadata_with_slice(
                    UBatchSlice(slice(nd, cm.num_reqs), slice(ndt, cm.num_actual_tokens)), cm
                )
                md.fa_prefill = self._fa_builder.build(0, sliced, fast_build)
        return md
