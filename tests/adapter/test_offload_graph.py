"""The offload decode-only forward as vLLM's full CUDA graphs run it, on the CPU (Triton kernels interpreted).

No engine: a `SparseRuntime` on the CPU, one `SparseServeImpl` per layer and `SparseServeMetadata` over persistent
buffers. Per step the test does what the builder does on the host (inputs copied into persistent buffers, the -1
padded page summaries, `SparseRuntime.begin_step`), then runs every layer's `_forward_offload` under the graph guard
(`tests.host_sync.graph_trace`): no host sync, and two decode steps with other contents (and other evictions) record
the same trace, so one capture replays both. The outputs equal the same sparse decode over a plain paged KV cache.
After each step the connector's working-set report runs under the sync guard too: it carries the previous step's.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import sparseserve_vllm.kernels.flash_h2d as fh
from sparseserve_vllm.config import SparseServeConfig
from tests.host_sync import allow_lagged_reads, forbid_host_sync, graph_trace

pytestmark = pytest.mark.skipif(not fh._INTERPRET, reason="needs TRITON_INTERPRET=1: the CPU torch paths synchronize")

LAYERS, HKV, HQ, D, BS, PS = 2, 2, 4, 16, 32, 8
PPB = BS // PS
BLOCKS, HBM_BLOCKS = 8, 3  # logical (host) blocks; the HBM pool holds 3 blocks' pages = 24 slots (one is trash)
ROWS, MAX_BLOCKS = 3, 3  # a padded decode batch of 3 rows (2 requests); block table width


def make_runtime(monkeypatch):
    from sparseserve_vllm.adapter import runtime as runtime_module
    from sparseserve_vllm.kernels import SparseDecodeWrapper, page_metadata

    monkeypatch.setattr(page_metadata, "resolve_backend", lambda backend, tensor: "triton")  # the CUDA code path
    cfg = SparseServeConfig(token_budget=4 * PS, page_size=PS, sink_pages=1, recent_pages=1, offload=True,
                            host_kv_gib=1, hbm_cache_gib=1, stats_interval_s=0)
    with monkeypatch.context() as mp:  # no statistics thread: it would read the tier while the guard is on
        mp.setattr(runtime_module.threading, "Thread", lambda **kw: SimpleNamespace(start=lambda: None))
        rt = runtime_module.SparseRuntime(
            cfg, SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=64, max_num_seqs=ROWS),
                                 attention_config=SimpleNamespace(backend=None),  # not selected: no segmented prefill
                                 instance_id="offload-graph", cache_config=SimpleNamespace()))
    rt.bind_geometry(block_size=BS, num_kv_heads=HKV, head_size=D, num_layers=LAYERS)
    rt.set_logical_blocks(BLOCKS)
    rt.wrapper = SparseDecodeWrapper(HQ, HKV, D, PS, PPB, token_budget=cfg.token_budget, sink_pages=1,
                                     recent_pages=1, device="cpu", dtype=torch.float32, backend="triton")
    rt.wrapper.plan(ROWS, MAX_BLOCKS * PPB)
    return rt


def make_impls(rt):
    from sparseserve_vllm.adapter.impl import SparseServeImpl

    impls = []
    for layer in range(LAYERS):
        impl = SparseServeImpl.__new__(SparseServeImpl)
        impl.num_heads, impl.head_size, impl.num_kv_heads, impl.scale = HQ, D, HKV, D ** -0.5
        impl.runtime, impl._layer_idx = rt, layer
        impls.append(impl)
    return impls


def metadata(*, slot_mapping, seq_lens, block_table, qsl_cpu, seq_lens_cpu, summarize, num_decodes):
    from sparseserve_vllm.adapter.backend import SparseServeMetadata

    n, nd = slot_mapping.numel(), num_decodes
    ndt = int(qsl_cpu[nd])
    return SparseServeMetadata(
        num_actual_tokens=n, slot_mapping=slot_mapping, num_decodes=nd, decode_seq_lens=seq_lens[:nd],
        decode_block_table=block_table[:nd], num_prefills=len(seq_lens_cpu) - nd, num_decode_tokens=ndt,
        prefill_query_start_loc_cpu=qsl_cpu[nd:] - ndt, prefill_seq_lens_cpu=seq_lens_cpu[nd:],
        prefill_block_table=block_table[nd:len(seq_lens_cpu)], query_start_loc_cpu=qsl_cpu,
        seq_lens_cpu=seq_lens_cpu, block_table=block_table[:len(seq_lens_cpu)], summarize_slots=summarize)


def test_offload_decode_steps_are_graph_safe_and_equal_the_paged_path(monkeypatch):
    from sparseserve_vllm.adapter.backend import SparseServeMetadataBuilder
    from sparseserve_vllm.adapter.impl import SparseServeImpl  # noqa: F401  (vLLM imported before any patch)
    from sparseserve_vllm.kernels import SparseDecodeWrapper, build_page_metadata

    gen = torch.Generator().manual_seed(0)
    rt = make_runtime(monkeypatch)
    impls = make_impls(rt)
    pool = torch.full((HBM_BLOCKS, HKV, BS, 2 * D), float("nan"))
    tables, lens = [[1, 5, 2], [4, 7, 0]], [44, 52]  # request A: blocks 1 5 2, B: 4 7 (0 = vLLM's null block)
    ref_kv = torch.zeros(LAYERS, BLOCKS, HKV, BS, 2 * D)  # the same KV in a plain paged cache, for the reference
    written = torch.zeros(LAYERS, BLOCKS, HKV, BS, 2 * D, dtype=torch.bool)

    def slot(r, pos):
        return tables[r][pos // BS] * BS + pos % BS

    def step_kv(n):
        return [(torch.randn(n, HQ, D, generator=gen), torch.randn(n, HKV, D, generator=gen),
                 torch.randn(n, HKV, D, generator=gen)) for _ in range(LAYERS)]

    def record(slots, kv):
        for layer, (_, k, v) in enumerate(kv):
            for t, s in enumerate(slots):
                if s >= 0:
                    ref_kv[layer, s // BS, :, s % BS] = torch.cat([k[t], v[t]], -1)
                    written[layer, s // BS, :, s % BS] = True

    bt = torch.tensor(tables + [[0] * MAX_BLOCKS], dtype=torch.int32)
    # Prefill, one request per step (the eager path: ring saves, dense attention from host).
    for r, n in enumerate(lens):
        slots = [slot(r, i) for i in range(n)]
        sm, qsl, sl = torch.tensor(slots), torch.tensor([0, n], dtype=torch.int32), torch.tensor([n])
        kv = step_kv(n)
        md = metadata(slot_mapping=sm, seq_lens=sl, block_table=bt[r:r + 1], qsl_cpu=qsl, seq_lens_cpu=sl,
                      summarize=rt.filled_page_slots(qsl, sl, bt[r:r + 1]), num_decodes=0)
        rt.begin_step(bt[:0], sl[:0], selects=False)
        for impl, (q, k, v) in zip(impls, kv):
            impl._forward_offload(None, q, k, v, pool, md, torch.empty(n, HQ * D))
        record(slots, kv)

    # Decode steps over persistent buffers, as vLLM and the builder keep them for full CUDA graphs.
    sm_buf = torch.full((ROWS,), -1, dtype=torch.long)
    lens_buf = torch.zeros(ROWS, dtype=torch.int32)
    q_buf, k_buf, v_buf = torch.zeros(ROWS, HQ, D), torch.zeros(ROWS, HKV, D), torch.zeros(ROWS, HKV, D)
    out_buf = torch.zeros(LAYERS, ROWS, HQ * D)
    summaries = SimpleNamespace(_decode_summaries=torch.full((ROWS * HKV,), -1, dtype=torch.long), _num_kv_heads=HKV)
    ref_wrapper = SparseDecodeWrapper(HQ, HKV, D, PS, PPB, token_budget=4 * PS, sink_pages=1, recent_pages=1,
                                      device="cpu", dtype=torch.float32, backend="triton")
    ref_wrapper.plan(ROWS, MAX_BLOCKS * PPB)
    traces = []
    for step in range(4):  # step 0 warms up (plans FlashH2D per layer), as vLLM runs before capturing
        slots = [slot(r, n) for r, n in enumerate(lens)]
        lens = [n + 1 for n in lens]
        kv = step_kv(2)
        # The builder's host work: vLLM's persistent inputs, the page summaries, the step start.
        qsl = torch.tensor([0, 1, 2, 2], dtype=torch.int32)
        lens_cpu = torch.tensor(lens + [0], dtype=torch.int32)
        sm_buf[:2] = torch.tensor(slots)
        lens_buf.copy_(lens_cpu)
        summarize = SparseServeMetadataBuilder._persistent_summaries(
            summaries, rt.filled_page_slots(qsl, lens_cpu, bt), ROWS)
        md = metadata(slot_mapping=sm_buf, seq_lens=lens_buf, block_table=bt, qsl_cpu=qsl, seq_lens_cpu=lens_cpu,
                      summarize=summarize, num_decodes=ROWS)
        rt.begin_step(bt, lens_cpu, selects=True)
        with monkeypatch.context() as mp:
            mp.setattr(fh, "_check_id_range", lambda *a: None)  # FlashH2D's range check of CPU ids (none on CUDA)
            for layer, (q, k, v) in enumerate(kv):  # the model's activations: graph intermediates in real life
                q_buf[:2], k_buf[:2], v_buf[:2] = q, k, v
                with graph_trace(mp) as ops:
                    impls[layer]._forward_offload(None, q_buf, k_buf, v_buf, pool, md, out_buf[layer])
                traces.append((step, layer, ops))
        record(slots, kv)
        with monkeypatch.context() as mp:
            forbid_host_sync(mp)
            allow_lagged_reads(mp)
            report = rt.working_set_report(step)
        if step:  # the previous decode step's, with its step number
            assert report is not None and report[0] == step - 1 and set(report[1]) == {1, 4}, report
        # Reference: the same sparse decode over the plain paged cache, metadata of every page from scratch.
        for layer, (q, _, _) in enumerate(kv):
            pages = ref_kv[layer].view(-1, PS, 2 * D)
            meta = torch.zeros(pages.shape[0], 2, D)
            build_page_metadata(pages, meta, torch.arange(pages.shape[0]), selector="cuboid_mean", backend="triton")
            want = ref_wrapper.run(q, pages, meta, bt[:2], lens_buf[:2], D ** -0.5)
            torch.testing.assert_close(out_buf[layer, :2].view(2, HQ, D), want, rtol=1e-5, atol=1e-5)
    for layer in range(LAYERS):
        by_step = [ops for s, l, ops in traces if l == layer]
        assert by_step[1] == by_step[2] == by_step[3], f"layer {layer}: the decode steps' traces differ"
        persistent = {x[1] for op in by_step[1] for x in op[1:] if isinstance(x, tuple) and x[0] == "persistent"}
        for name, buf in (("slot_mapping", sm_buf), ("seq_lens", lens_buf), ("block_table", bt),
                          ("summaries", summaries._decode_summaries), ("query", q_buf), ("pool", pool)):
            assert buf.data_ptr() in persistent, f"{name} is not read from its persistent buffer"
    st = rt.tier.stats()
    assert st["hbm_evictions"] > 0 and st["hbm_misses"] > 0, st
    rt.tier.saver.wait_all()
    torch.testing.assert_close(rt.tier.host.kv[written], ref_kv[written], rtol=0, atol=0)
    rt.tier.close()
    rt.tier = None
