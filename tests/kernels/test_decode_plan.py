"""SparseDecodeWrapper end to end: dense equivalence at full budget, sparse selection + attention, counters."""

import pytest
import torch

from sparseserve_vllm.kernels import SparseDecodeWrapper, build_page_metadata, flat_page_view

from .conftest import (BACKENDS, DEVICE, make_block_table, make_kv, ref_attention_pages, ref_dense_decode,
                       ref_scores, ref_select, ref_slots)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _setup(bsz, hq, hkv, d, page, ppb, max_blocks, seq, selector, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = bsz * max_blocks + 2
    kv = make_kv(num_blocks, hkv, page * ppb, d, dtype, gen)
    kv_pages = flat_page_view(kv, page)
    meta = torch.zeros((kv_pages.shape[0], 1 if selector == "mean" else 2, d), dtype=dtype, device=DEVICE)
    build_page_metadata(kv_pages, meta, torch.arange(kv_pages.shape[0], device=DEVICE), selector=selector)
    bt = make_block_table(bsz, max_blocks, num_blocks, gen)
    q = torch.randn((bsz, hq, d), generator=gen).to(DEVICE, dtype)
    return kv, kv_pages, meta, bt, q, torch.tensor(seq, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,hq,hkv,d,page,ppb,selector,splits", [
    (torch.float32, 8, 2, 64, 16, 2, "cuboid_mean", None),
    (torch.bfloat16, 16, 2, 128, 32, 1, "quest", 2),
    (torch.float32, 4, 4, 64, 16, 1, "mean", 3),
])
def test_full_budget_equals_dense_decode(backend, dtype, hq, hkv, d, page, ppb, selector, splits):
    """token_budget >= context: every page is attended, so the output is dense decode attention."""
    max_blocks = 5
    ctx = max_blocks * ppb * page
    seq = [ctx, ctx - 1, page + 3, 1]
    kv, kv_pages, meta, bt, q, seq_t = _setup(4, hq, hkv, d, page, ppb, max_blocks, seq, selector, dtype, 21)
    w = SparseDecodeWrapper(hq, hkv, d, page, ppb, selector=selector, token_budget=ctx, sink_pages=1,
                            recent_pages=1, device=DEVICE, dtype=dtype, backend=backend)
    w.plan(4, max_blocks * ppb, num_splits=splits)
    out = torch.full_like(q, float("nan"))
    w.run(q, kv_pages, meta, bt, seq_t, d ** -0.5, out=out)
    ref = ref_dense_decode(q, kv, bt, seq_t, d ** -0.5)
    torch.testing.assert_close(out.double().cpu(), ref, **TOL[dtype])
    n_pages = [(s + page - 1) // page for s in seq]
    sel = w.last_page_indices.cpu()
    for b, n in enumerate(n_pages):
        assert sel[b, :, :n].tolist() == [list(range(n))] * hkv and (sel[b, :, n:] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("selector, gqa_reduce", [("cuboid_mean", "sum"), ("quest", "max"), ("mean", "mass"),
                                                  ("quest", "zmax")])
def test_sparse_step_matches_reference_pipeline(backend, selector, gqa_reduce):
    bsz, hq, hkv, d, page, ppb, max_blocks = 3, 8, 2, 64, 16, 2, 6
    budget, sink, recent = 6 * page, 1, 2
    seq = [max_blocks * ppb * page, 7 * page + 5, 5 * page]      # sparse, sparse+partial, dense (5 <= 6 pages)
    kv, kv_pages, meta, bt, q, seq_t = _setup(bsz, hq, hkv, d, page, ppb, max_blocks, seq, selector,
                                              torch.float32, 33)
    w = SparseDecodeWrapper(hq, hkv, d, page, ppb, selector=selector, token_budget=budget, sink_pages=sink,
                            recent_pages=recent, device=DEVICE, dtype=torch.float32, backend=backend,
                            gqa_reduce=gqa_reduce)
    w.plan(bsz + 2, max_blocks * ppb)                             # a larger plan serves a smaller batch
    out = torch.full_like(q, float("nan"))
    w.run(q, kv_pages, meta, bt, seq_t, 0.2, out=out)

    nf = seq_t.cpu() // page
    scores = ref_scores(q, meta, bt, nf, selector, ppb, hkv, max_blocks * ppb, gqa_reduce,
                        0.2 if gqa_reduce == "mass" else None)
    sel = ref_select(scores, seq_t, page, budget // page, sink, recent)
    assert torch.equal(w.last_page_indices.cpu(), sel)
    slots, lens = ref_slots(sel, bt, seq_t, page, ppb, hkv)
    assert torch.equal(w.last_slots.cpu(), slots) and torch.equal(w.last_page_lens.cpu(), lens)
    ref = ref_attention_pages(q, kv_pages, slots, lens, 0.2)
    torch.testing.assert_close(out.double().cpu(), ref, **TOL[torch.float32])

    counts = [hkv * int(nf.sum()), int((sel >= 0).sum()), int(lens.sum())]
    assert w.counters.cpu().tolist() == counts
    default_out = w.run(q, kv_pages, meta, bt, seq_t, 0.2)           # second run, into the plan's own buffer
    torch.testing.assert_close(default_out.double().cpu(), ref, **TOL[torch.float32])
    assert [int(w.pages_scored), int(w.pages_selected), int(w.tokens_attended)] == [2 * c for c in counts]
    w.reset_counters()
    assert w.counters.cpu().tolist() == [0, 0, 0]


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("gqa_reduce", ["sum", "mass", "zmax"])
def test_run_is_cuda_graph_capturable(gqa_reduce):
    bsz, hq, hkv, d, page, ppb, max_blocks = 4, 32, 8, 128, 32, 1, 40
    seq = [max_blocks * page, 1000, 33, 700]
    kv, kv_pages, meta, bt, q, seq_t = _setup(bsz, hq, hkv, d, page, ppb, max_blocks, seq, "cuboid_mean",
                                              torch.bfloat16, 5)
    w = SparseDecodeWrapper(hq, hkv, d, page, ppb, token_budget=512, device=DEVICE, dtype=torch.bfloat16,
                            gqa_reduce=gqa_reduce)
    w.plan(bsz, max_blocks * ppb, num_splits=2)
    eager = w.run(q, kv_pages, meta, bt, seq_t, d ** -0.5).clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        w.run(q, kv_pages, meta, bt, seq_t, d ** -0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w.run(q, kv_pages, meta, bt, seq_t, d ** -0.5)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_constructor_and_plan_validation():
    with pytest.raises(ValueError, match="sink_pages \\+ recent_pages \\+ 1"):
        SparseDecodeWrapper(8, 2, 64, 16, 1, token_budget=64, sink_pages=2, recent_pages=2, device=DEVICE)
    with pytest.raises(ValueError, match="num_kv_heads"):
        SparseDecodeWrapper(8, 3, 64, 16, 1, device=DEVICE)
    with pytest.raises(ValueError, match="selector"):
        SparseDecodeWrapper(8, 2, 64, 16, 1, selector="oracle", device=DEVICE)
    with pytest.raises(ValueError, match="backend"):
        SparseDecodeWrapper(8, 2, 64, 16, 1, device=DEVICE, backend="cuda")
    with pytest.raises(ValueError, match="gqa_reduce must be one of sum, max, mass, zmax"):
        SparseDecodeWrapper(8, 2, 64, 16, 1, device=DEVICE, gqa_reduce="softmax")
    w = SparseDecodeWrapper(8, 2, 64, 16, 1, device=DEVICE, dtype=torch.float32)
    q = torch.zeros((2, 8, 64), device=DEVICE)
    with pytest.raises(ValueError, match="plan"):
        w.run(q, None, None, None, None, 1.0)
    w.plan(1, 8)
    with pytest.raises(ValueError, match="batch_size"):
        w.run(q, torch.zeros((4, 16, 128), device=DEVICE), None, torch.zeros((2, 8), dtype=torch.int32),
              torch.zeros(2, dtype=torch.int32), 1.0)
