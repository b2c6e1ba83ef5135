"""select_pages (Triton kernel and torch path) against a Python-loop reference of the selection rule."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseserve_vllm.kernels import page_topk, pages_to_slots, select_pages

from .conftest import BACKENDS, DEVICE, make_block_table, ref_select, ref_slots

POISON = -777


@pytest.fixture(autouse=True, params=[1024, 16], ids=["chunk1024", "chunk16"])
def select_chunk(request, monkeypatch):
    """The Triton kernel walks a row CHUNK pages at a time: also run every test with chunks far shorter than the
    rows, so selections, ties and compaction cross chunk boundaries."""
    chunk = 256 if request.param == 16 and request.node.originalname == "test_long_rows" else request.param
    monkeypatch.setitem(page_topk.SELECT_LAUNCH, "chunk", chunk)  # (long rows: 256, or the interpreter takes minutes)


@pytest.fixture(autouse=True, params=[16, 4, 2], ids=["radix16", "radix4", "radix2"])
def select_radix(request, monkeypatch):
    """Every test with each threshold search the kernel may launch (whatever the grid's size)."""
    monkeypatch.setitem(page_topk.SELECT_LAUNCH, "radix", request.param)
    monkeypatch.setitem(page_topk.SELECT_LAUNCH, "radix_one_wave", request.param)


def _run(scores, seq, backend, **kw):
    out = torch.full((scores.shape[0], scores.shape[1], kw["num_select"]), POISON, dtype=torch.int32, device=DEVICE)
    select_pages(scores, seq, out=out, backend=backend, **kw)
    return out.cpu()


def _scores(bsz, hkv, n_pages, gen, ties=False):
    if ties:   # few distinct values: many ties, which the lower page index must win
        s = torch.randint(-2, 3, (bsz, hkv, n_pages), generator=gen).float()
    else:
        s = torch.randn((bsz, hkv, n_pages), generator=gen)
    return s.to(DEVICE)


# (page_size, num_select, sink, recent, seq_lens, n_pages)
CASES = [
    (16, 8, 1, 2, [0, 1, 16, 127, 128, 129, 144, 500], 40),     # n around num_select, empty, partial
    (32, 6, 2, 2, [33, 64 * 32, 1000, 191, 192, 193], 64),      # sink + recent + partial fill the budget
    (16, 5, 0, 0, [400, 80, 81, 20], 25),                       # no forced pages
    (64, 4, 1, 2, [64 * 3 + 1, 64 * 4, 64 * 4 + 1, 63], 12),    # forced pages == num_select (no top-k left)
    (16, 12, 3, 3, [16 * 5, 16 * 12, 16 * 13 - 1, 16 * 40], 40),  # sink/recent overlap for short requests
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_selection_matches_reference(case, ties, backend):
    page, k, sink, recent, seq, n_pages = case
    gen = torch.Generator().manual_seed(10 * CASES.index(case) + ties)
    seq = torch.tensor(seq, dtype=torch.int32, device=DEVICE)
    scores = _scores(len(seq), 3, n_pages, gen, ties)
    got = _run(scores, seq, backend, page_size=page, num_select=k, sink_pages=sink, recent_pages=recent)
    assert torch.equal(got, ref_select(scores, seq, page, k, sink, recent))


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_and_nan_scores(backend):
    gen = torch.Generator().manual_seed(3)
    seq = torch.tensor([16 * 30, 16 * 30 + 5], dtype=torch.int32, device=DEVICE)
    scores = _scores(2, 2, 32, gen)
    scores[0, 0, 5:20] = float("-inf")
    scores[0, 1, ::3] = float("nan")
    scores[1, 0, 7] = float("inf")
    scores[1, 1, :] = float("-inf")
    got = _run(scores, seq, backend, page_size=16, num_select=8, sink_pages=1, recent_pages=1)
    assert torch.equal(got, ref_select(scores, seq, 16, 8, 1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_pages", [1500, 8192])     # rows of 2048- and 8192-wide blocks
def test_long_rows(backend, n_pages):
    gen = torch.Generator().manual_seed(n_pages)
    page, k = 32, 64
    seq = torch.tensor([n_pages * page, n_pages * page - 7, 1000 * page + 1], dtype=torch.int32, device=DEVICE)
    scores = _scores(3, 1, n_pages, gen)
    scores[1, 0, 100:200] = 5.0                     # a large tie group straddling the threshold
    ulps = torch.tensor(7.0).view(torch.int32) + torch.randperm(100, generator=gen).to(torch.int32)
    scores[2, 0, 300:400] = ulps.view(torch.float32).to(DEVICE)   # top scores one ulp apart around the threshold
    got = _run(scores, seq, backend, page_size=page, num_select=k, sink_pages=2, recent_pages=4)
    assert torch.equal(got, ref_select(scores, seq, page, k, 2, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ppb", [1, 2])
def test_fused_slots_lens_and_counters(backend, ppb):
    gen = torch.Generator().manual_seed(5 + ppb)
    page, k, hkv, max_blocks = 16, 6, 2, 8
    n_pages = max_blocks * ppb
    seq = torch.tensor([0, 40, 16 * n_pages, 16 * n_pages - 3, 97], dtype=torch.int32, device=DEVICE)
    bt = make_block_table(len(seq), max_blocks, len(seq) * max_blocks + 2, gen)
    scores = _scores(len(seq), hkv, n_pages, gen)
    shape = (len(seq), hkv, k)
    slots = torch.full(shape, POISON, dtype=torch.int32, device=DEVICE)
    lens = torch.full(shape, POISON, dtype=torch.int32, device=DEVICE)
    counters = torch.tensor([5, 6, 7], dtype=torch.int64, device=DEVICE)
    out = torch.full(shape, POISON, dtype=torch.int32, device=DEVICE)
    select_pages(scores, seq, page_size=page, num_select=k, sink_pages=1, recent_pages=1, out=out, block_table=bt,
                 ppb=ppb, slots_out=slots, lens_out=lens, counters=counters, backend=backend)
    ref_idx = ref_select(scores, seq, page, k, 1, 1)
    assert torch.equal(out.cpu(), ref_idx)
    rs, rl = ref_slots(ref_idx, bt, seq, page, ppb, hkv)
    assert torch.equal(slots.cpu(), rs) and torch.equal(lens.cpu(), rl)
    ts, tl_ = pages_to_slots(ref_idx.to(DEVICE), bt, seq, page_size=page, ppb=ppb, num_kv_heads=hkv)
    assert torch.equal(ts.cpu(), rs) and torch.equal(tl_.cpu(), rl)
    seq_c = seq.cpu().long()
    scored = 5 + hkv * int((seq_c // page).sum())
    selected = 6 + int((ref_idx >= 0).sum())
    tokens = 7 + int(rl.sum())
    assert counters.cpu().tolist() == [scored, selected, tokens]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_selection_property_based(data):
    """Random page sizes, budgets, forced windows and lengths; both backends agree with the reference."""
    page = data.draw(st.sampled_from([16, 32]))
    k = data.draw(st.integers(1, 12))
    sink = data.draw(st.integers(0, k - 1))
    recent = data.draw(st.integers(0, k - 1 - sink))
    n_pages = data.draw(st.integers(1, 40))
    seq = data.draw(st.lists(st.integers(0, n_pages * page), min_size=1, max_size=4))
    seed = data.draw(st.integers(0, 2**16))
    ties = data.draw(st.booleans())
    seq = torch.tensor(seq, dtype=torch.int32, device=DEVICE)
    scores = _scores(len(seq), 2, n_pages, torch.Generator().manual_seed(seed), ties)
    ref = ref_select(scores, seq, page, k, sink, recent)
    for backend in BACKENDS:
        got = _run(scores, seq, backend, page_size=page, num_select=k, sink_pages=sink, recent_pages=recent)
        assert torch.equal(got, ref), backend


def test_bad_arguments():
    scores = torch.zeros((1, 1, 8), device=DEVICE)
    seq = torch.tensor([100], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="sink_pages \\+ recent_pages \\+ 1"):
        select_pages(scores, seq, page_size=16, num_select=4, sink_pages=2, recent_pages=2)
    with pytest.raises(ValueError, match="scores"):
        select_pages(scores.double(), seq, page_size=16, num_select=4, sink_pages=1, recent_pages=1)
    with pytest.raises(ValueError, match="out"):
        select_pages(scores, seq, page_size=16, num_select=4, sink_pages=1, recent_pages=1,
                     out=torch.empty((1, 1, 5), dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="pages per request"):
        select_pages(torch.zeros((1, 1, 16385), device=DEVICE), seq, page_size=16, num_select=4, sink_pages=1,
                     recent_pages=1, backend="triton")
