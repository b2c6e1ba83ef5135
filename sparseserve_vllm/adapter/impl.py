"""`SparseServeImpl`: the per-layer attention of the SparseServe backend.

Contract of `forward(layer, query, key, value, kv_cache, attn_metadata, output)`:
1. writes this step's K/V into `kv_cache` at `slot_mapping` (vLLM's `reshape_and_cache_flash` on CUDA, torch on CPU);
2. writes the page metadata of every page that this step filled (`attn_metadata.summarize_*`);
3. decode rows of sparse layers: score every full page per KV head, keep the top pages within `token_budget`
   (plus sink, recent and the last partial page) and attend to those only (`kernels.SparseDecodeWrapper`);
4. prefill rows, and every row of the first `dense_layers` layers: exact dense causal attention
   (vLLM's FlashAttention on CUDA, `kernels.paged_dense_torch` on CPU).
`attn_metadata is None` (profiling / warm-up runs) only zero-fills `output`.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from sparseserve_vllm.adapter.runtime import get_runtime
from sparseserve_vllm.kernels import build_page_metadata
from sparseserve_vllm.kernels.paged_dense_torch import paged_causal_attention, write_kv


class SparseServeImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra_impl_args,
    ) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes,
            "sliding_window": sliding_window,
            "logits_soft_cap": logits_soft_cap or None,
            "sinks": extra_impl_args.get("sinks"),
        }
        used = [k for k, v in unsupported.items() if v is not None]
        if used:
            raise NotImplementedError(
                f"The sparseserve attention backend supports plain causal decoder attention; this model's layers use "
                f"{', '.join(used)}. Use another --attention-backend for this model."
            )
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"The sparseserve attention backend supports decoder attention only, not {attn_type}")
        if kv_cache_dtype not in ("auto", "float16", "bfloat16"):
            raise NotImplementedError(
                f"The sparseserve attention backend does not support kv_cache_dtype={kv_cache_dtype!r}; allowed: auto, float16, bfloat16"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.runtime = get_runtime(get_current_vllm_config())
        self._fa = None  # vLLM's FlashAttentionImpl for dense rows on CUDA, made on first CUDA forward
        self._fa_args = (num_heads, head_size, scale, num_kv_heads, None, None, kv_cache_dtype)
        self._layer_idx: int | None = None

    def _dense_gpu(self):
        if self._fa is None:
            from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

            self._fa = FlashAttentionImpl(*self._fa_args)
        return self._fa

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the sparseserve backend")
        if attn_metadata is None:
            return output.fill_(0)
        md = attn_metadata
        rt = self.runtime
        if self._layer_idx is None:
            self._layer_idx = extract_layer_index(layer.layer_name)
        n = md.num_actual_tokens
        on_cuda = kv_cache.is_cuda
        if self.kv_sharing_target_layer_name is None:
            if on_cuda:
                self._dense_gpu().do_kv_cache_update(layer, key, value, kv_cache, md.slot_mapping)
            else:
                write_kv(kv_cache, key, value, md.slot_mapping)
        kv_pages = kv_cache.view(-1, rt.cfg.page_size, kv_cache.shape[-1])
        meta = rt.page_meta(self._layer_idx, kv_cache)
        if md.summarize_slots.numel():
            build_page_metadata(kv_pages, meta, md.summarize_slots, selector=rt.cfg.selector)
            rt.count(pages_summarized=md.summarize_slots.numel())

        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if self._layer_idx < rt.cfg.dense_layers:
            self._dense(layer, query, key, value, kv_cache, md, q, out, 0, n, whole=True)
            rt.count(dense_tokens=n)
            return output
        nd = md.num_decodes
        if nd:
            wrapper = rt.wrapper_for(self.num_heads, q.dtype, q.device)
            wrapper.run(q[:nd], kv_pages, meta, md.decode_block_table, md.decode_seq_lens, self.scale, out[:nd])
            rt.count(
                decode_steps=1,
                decode_queries=nd,
                pages_scored=md.pages_scored,
                pages_selected=md.pages_selected,
                tokens_attended=md.tokens_attended,
            )
        if md.num_prefills:
            self._dense(layer, query, key, value, kv_cache, md, q, out, md.num_decode_tokens, n, whole=False)
            rt.count(dense_tokens=n - md.num_decode_tokens)
        return output

    def _dense(self, layer, query, key, value, kv_cache, md, q, out, start, end, *, whole: bool) -> None:
        if kv_cache.is_cuda:
            fa_md = md.fa_all if whole else md.fa_prefill
            self._dense_gpu().forward(
                layer, query[start:end], key[start:end], value[start:end], kv_cache, fa_md, out[start:end]
            )
        elif whole:
            paged_causal_attention(q, kv_cache, md.block_table, md.query_start_loc_cpu, md.seq_lens_cpu, self.scale, out)
        else:
            paged_causal_attention(
                q[start:end], kv_cache, md.prefill_block_table, md.prefill_query_start_loc_cpu,
                md.prefill_seq_lens_cpu, self.scale, out[start:end],
            )
