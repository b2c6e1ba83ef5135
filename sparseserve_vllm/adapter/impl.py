"""`SparseServeImpl`: the per-layer attention of the SparseServe backend.

Contract of `forward(layer, query, key, value, kv_cache, attn_metadata, output)`:
1. writes this step's K/V into `kv_cache` at `slot_mapping` (vLLM's `reshape_and_cache_flash` on CUDA, torch on CPU);
2. writes the page metadata of every page that this step filled (`attn_metadata.summarize_*`);
3. decode rows of sparse layers: score every full page per KV head, keep the top pages within `token_budget`
   (plus sink, recent and the last partial page) and attend to those only (`kernels.SparseDecodeWrapper`);
4. prefill rows, and every row of the first `dense_layers` layers: exact dense causal attention
   (vLLM's FlashAttention on CUDA, `kernels.paged_dense_torch` on CPU).
With `offload` on, `kv_cache` is the HBM page pool that every layer shares and the runtime's `OffloadTier` holds
the KV: step 1 writes the new tokens through into cached pages (and, after step 4, saves them to host DRAM with
FlashD2H: inline on the current stream for decode-only batches, through the saver's ring otherwise), step 2 reads
the filled pages from their cache slots, step 3 resolves the selected pages to cache slots (misses loaded by
FlashH2D) before attending and records them in the runtime's working-set tracker, and dense rows gather their
request's context of this layer from host DRAM into a scratch buffer.
Decode-only batches of sparse layers (with or without offload) never synchronize with the host and read only
persistent tensors or device state, so vLLM's full CUDA graphs capture them (see `backend.py`).
A `SegmentMetadata` (layer-segmented prefill, `adapter/segmented_prefill.py`) runs one unit of a prompt's prefill
in this layer instead: its tokens attend to the layer's prompt KV in the job's scratch, and their KV goes to host DRAM
(through the saver's ring: such steps are never captured in a CUDA graph); the last prompt token's output is kept
for the step that runs that token, which then reloads no context.
`attn_metadata is None` (profiling / warm-up runs) only zero-fills `output`.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from sparseserve_vllm.adapter.runtime import get_runtime
from sparseserve_vllm.adapter.segmented_prefill import SegmentMetadata
from sparseserve_vllm.kernels import build_page_metadata
from sparseserve_vllm.kernels.paged_dense_torch import causal_attention, paged_causal_attention, write_kv


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
        if kv_sharing_target_layer_name is not None:
            raise NotImplementedError("The sparseserve attention backend does not support KV sharing between layers")
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
        if isinstance(md, SegmentMetadata):
            return self._forward_segment(query, key, value, kv_cache, md, output)
        if rt.cfg.offload:
            return self._forward_offload(layer, query, key, value, kv_cache, md, output)
        n = md.num_actual_tokens
        if kv_cache.is_cuda:
            self._dense_gpu().do_kv_cache_update(layer, key, value, kv_cache, md.slot_mapping)
        else:
            write_kv(kv_cache, key, value, md.slot_mapping)
        kv_pages = kv_cache.view(-1, rt.cfg.page_size, kv_cache.shape[-1])
        meta = rt.page_meta(self._layer_idx, kv_cache)
        if md.summarize_slots.numel():
            build_page_metadata(kv_pages, meta, md.summarize_slots, selector=rt.cfg.selector)

        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if self._layer_idx < rt.cfg.dense_layers:
            self._dense(layer, query, key, value, kv_cache, md, q, out, 0, n, whole=True)
            return output
        nd = md.num_decodes
        if nd:
            rt.wrapper.run(q[:nd], kv_pages, meta, md.decode_block_table, md.decode_seq_lens, self.scale, out[:nd])
        if md.num_prefills:
            self._dense(layer, query, key, value, kv_cache, md, q, out, md.num_decode_tokens, n, whole=False)
        return output

    def _forward_offload(self, layer, query, key, value, kv_cache, md, output):
        """Offload forward. Decode-only batches (`num_prefills == 0`, sparse layers) run without host sync and
        without Python state that changes between steps, so vLLM's full CUDA graphs capture them: the builder does
        the step's host work (`SparseRuntime.begin_step`) and copies every per-step input into persistent buffers;
        saves go inline on the current stream. Other batches save through FlashD2H's ring (eager)."""
        rt, li, n = self.runtime, self._layer_idx, md.num_actual_tokens
        tier = rt.tier_for(kv_cache)
        tier.begin_layer()
        slot_mapping = md.slot_mapping[:n]
        tier.write_new(li, key, value, slot_mapping)
        meta = rt.page_meta(li, kv_cache)
        if md.summarize_slots.numel():
            # Logical pages -> the cache slots `write_new` just filled, read there; -1 padding (and a page left
            # without a slot) is skipped: fixed shapes, no host sync.
            cached = tier.resident_slots(li, md.summarize_slots)
            build_page_metadata(tier.cache_pages, meta, md.summarize_slots, selector=rt.cfg.selector, src_slots=cached)
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if li < rt.cfg.dense_layers:  # eager only: the backend declares NEVER for offload with dense layers
            self._dense_from_host(tier, q, key, value, out, md.query_start_loc_cpu, md.seq_lens_cpu, md.block_table, 0)
            tier.save(li, key, value, slot_mapping)
            return output
        nd = md.num_decodes
        if nd:
            selected = []  # the logical pages the wrapper selected, -1 where none (its padding has length 0)

            def to_cache_slots(slots, lens):
                selected.append(torch.where(lens > 0, slots, -1).reshape(-1))
                return tier.resolve(li, selected[0]).view(slots.shape).clamp_min(0)

            rt.wrapper.run(q[:nd], tier.cache_pages, meta, md.decode_block_table, md.decode_seq_lens, self.scale,
                           out[:nd], translate=to_cache_slots)
            rt.record_selection(li, selected[0])
        # Saves last: the loads above wait only for earlier layers' saves.
        if md.num_prefills:
            self._dense_from_host(tier, q, key, value, out, md.prefill_query_start_loc_cpu, md.prefill_seq_lens_cpu,
                                  md.prefill_block_table, md.num_decode_tokens)
            tier.save(li, key, value, slot_mapping)
        else:
            tier.save_inline(li, key, value, slot_mapping)
        return output

    def _forward_segment(self, query, key, value, kv_cache, md, output):
        """One unit of a layer-segmented prefill: the job's tokens `[md.start, md.end)` in this layer attend causally
        to the layer's prompt KV in the job's one-layer scratch; the pages they fill get their metadata; the new
        KV goes to host DRAM (FlashD2H). The HBM page cache is not touched."""
        rt, li, job = self.runtime, self._layer_idx, md.job
        a, b = md.start, md.end
        n = b - a
        tier = rt.tier_for(kv_cache)
        k, v = job.scratch(self.num_kv_heads, self.head_size, kv_cache.dtype, kv_cache.device)
        k[a:b] = key[:n]
        v[a:b] = value[:n]
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = self._attend_context(q, k[:b], v[:b])
        output[:n].view(n, self.num_heads, self.head_size).copy_(out)
        if b == job.num_tokens:
            job.keep_last(li, out[-1])
        s = min(b, job.num_saved)  # the prompt's last token is written and saved by vLLM's step that runs it
        ps, h = rt.cfg.page_size, self.num_kv_heads
        p0, p1, flat = job.filled_pages(a, s, ps, rt.ppb, h)
        if flat is not None:
            kv = torch.cat((k[p0 * ps: p1 * ps], v[p0 * ps: p1 * ps]), dim=-1)  # [tokens, Hkv, 2D]
            pages = kv.view(p1 - p0, ps, h, -1).transpose(1, 2).reshape((p1 - p0) * h, ps, kv.shape[-1])
            self._summarize_pages(rt.page_meta(li, kv_cache), pages, flat.reshape(-1))
            rt.count(pages_summarized=pages.shape[0])
        if s > a:  # whole blocks by the copy engine, the partial ones at either end through the ring
            bs = tier.host.block_size
            b0, b1 = -(-a // bs), s // bs  # the whole blocks [b0, b1) of tokens [a, s)
            ends = ((a, b0 * bs), (b1 * bs, s)) if b1 > b0 else ((a, s),)
            for t0, t1 in ends:
                if t1 > t0:
                    tier.save(li, key[t0 - a: t1 - a], value[t0 - a: t1 - a], job.host_slots[t0:t1])
            if b1 > b0:
                tier.save_blocks(li, key[b0 * bs - a: b1 * bs - a], value[b0 * bs - a: b1 * bs - a],
                                 job.spec.block_ids[b0:b1])
        return output

    def _summarize_pages(self, meta, pages, slots) -> None:
        """Metadata rows `meta[slots]` of the gathered pages `pages` ([len(slots), page_size, 2D], in that order);
        a -1 slot writes meta's trash row (the last). No host sync: safe inside a captured CUDA graph."""
        fresh = torch.empty((pages.shape[0],) + meta.shape[1:], dtype=meta.dtype, device=meta.device)
        build_page_metadata(pages, fresh, torch.arange(pages.shape[0], device=meta.device),
                            selector=self.runtime.cfg.selector)
        meta[slots] = fresh

    def _dense_from_host(self, tier, q, key, value, out, query_start_loc, seq_lens, block_table, offset: int) -> None:
        """Dense causal attention of the rows `offset + query_start_loc[r] ..`, context gathered from host DRAM; a
        prompt's last token whose layer-segmented prefill kept its attention output (`rt.segment_last`) takes that
        instead, when its row is the step's only one-token row of that length."""
        bs = tier.host.block_size
        qsl = [int(x) + offset for x in query_start_loc]
        lengths = [int(x) for x in seq_lens]
        kept = self.runtime.segment_last
        if kept:
            ones = [n for r, n in enumerate(lengths) if qsl[r + 1] - qsl[r] == 1]
            kept = {n: o for n, o in kept.items() if ones.count(n) == 1}
        for r, length in enumerate(lengths):
            a, b = qsl[r], qsl[r + 1]
            if a == b:
                continue
            if b - a == 1 and length in kept:
                out[a] = kept[length][self._layer_idx]
                self.runtime.count(segment_last_token_layers=1)
                continue
            k, v = tier.gather_context(self._layer_idx, block_table[r, : -(-length // bs)], length, key[a:b], value[a:b])
            out[a:b] = self._attend_context(q[a:b], k.transpose(0, 1), v.transpose(0, 1))

    def _attend_context(self, q, k, v):
        """Causal attention of `q [qlen, Hq, D]` (the last qlen positions) over a context `k, v [L, Hkv, D]`:
        vLLM's FlashAttention varlen kernel on CUDA (bottom-right causal alignment), torch on CPU."""
        if not q.is_cuda:
            return causal_attention(q, k.transpose(0, 1), v.transpose(0, 1), self.scale)
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version

        qlen, length = q.shape[0], k.shape[0]
        # [0, n] made on the device: a tensor built from a host list is a pageable copy, which waits for the stream
        cu = torch.arange(2, dtype=torch.int32, device=q.device)
        cu_q, cu_k = cu * qlen, cu * length
        return flash_attn_varlen_func(
            q=q, k=k.contiguous(), v=v.contiguous(), max_seqlen_q=qlen, cu_seqlens_q=cu_q, max_seqlen_k=length,
            cu_seqlens_k=cu_k, softmax_scale=self.scale, causal=True, fa_version=get_flash_attn_version(),
        )

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
