"""score_pages (Triton kernel and torch path) against a float64 per-head reference."""

import pytest
import torch

from sparseserve_vllm.kernels import score_pages

from .conftest import BACKENDS, DEVICE, make_block_table, make_meta, ref_scores

CASES = [
    # (B, Hq, Hkv, D, page_size, ppb, max_blocks, selector, dtype)
    (3, 4, 4, 64, 16, 1, 6, "cuboid_mean", torch.float32),
    (2, 8, 2, 64, 16, 2, 5, "quest", torch.float32),
    (2, 16, 2, 128, 32, 1, 9, "mean", torch.bfloat16),
    (3, 8, 1, 64, 16, 4, 3, "cuboid_mean", torch.float16),
    (2, 16, 8, 128, 32, 2, 4, "quest", torch.bfloat16),
    (1, 4, 2, 64, 64, 1, 80, "cuboid_mean", torch.float32),   # > 64 pages: several page blocks
    (2, 6, 3, 96, 16, 2, 7, "quest", torch.float32),          # Hkv and D not powers of two
    (1, 16, 2, 64, 16, 1, 1100, "mean", torch.float32),       # G 8: mass combines 1100 pages in 3 chunks of 512
    (4, 8, 2, 64, 16, 1, 700, "quest", torch.float32),        # a wide table, short requests: blocks without full pages
    (2, 8, 2, 128, 64, 2, 5, "quest", torch.bfloat16),        # quest's default 64-token pages in 128-token blocks
]


@pytest.mark.parametrize("gqa_reduce", ["sum", "max", "mass", "zmax"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[7]}-G{c[1] // c[2]}-{str(c[8])[6:]}")
def test_scores_match_float64_reference(case, backend, gqa_reduce):
    bsz, hq, hkv, d, page, ppb, max_blocks, selector, dtype = case
    gen = torch.Generator().manual_seed(100 + CASES.index(case))
    num_blocks = bsz * max_blocks + 3
    bt = make_block_table(bsz, max_blocks, num_blocks, gen)
    n_pages = max_blocks * ppb
    seq = torch.randint(0, n_pages * page + 1, (bsz,), generator=gen)
    seq[0] = n_pages * page                                   # one request fills its whole table
    if bsz > 3:
        seq[1:] = torch.tensor([0, 15, 100 * page + 3])[: bsz - 1]  # no full page, none, 100 of 700
    num_full = (seq // page).to(torch.int32).to(DEVICE)
    # Block-table entries past the full pages are garbage that must never be read.
    blocks_used = (num_full.cpu() + ppb - 1) // ppb
    for b in range(bsz):
        bt[b, int(blocks_used[b]):] = 10**8
    q = torch.randn((bsz, hq, d), generator=gen).to(DEVICE, dtype)
    meta = make_meta(num_blocks * hkv * ppb, d, selector, dtype, gen)
    out = torch.full((bsz, hkv, n_pages), float("nan"), device=DEVICE)
    scale = d ** -0.5 if gqa_reduce == "mass" else None
    head_scores = (torch.full((bsz + 1, hq, n_pages + 2), float("nan"), device=DEVICE)
                   if gqa_reduce in ("mass", "zmax") else None)

    score_pages(q, meta, bt, num_full, selector=selector, page_size=page, ppb=ppb, num_kv_heads=hkv, out=out,
                gqa_reduce=gqa_reduce, scale=scale, head_scores=head_scores, backend=backend)

    ref = ref_scores(q, meta, bt, num_full, selector, ppb, hkv, n_pages, gqa_reduce, scale)
    got = out.double().cpu()
    assert not torch.isnan(got).any()
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("gqa_reduce", ["sum", "max", "mass", "zmax"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_columns_than_table_and_strided_q(backend, gqa_reduce):
    gen = torch.Generator().manual_seed(7)
    bsz, hq, hkv, d, page, ppb, max_blocks = 2, 8, 2, 64, 16, 2, 6
    num_blocks = bsz * max_blocks
    bt = make_block_table(bsz, max_blocks, num_blocks, gen)
    n_pages = 7                                               # < max_blocks * ppb = 12
    num_full = torch.tensor([7, 3], dtype=torch.int32, device=DEVICE)
    q_big = torch.randn((bsz, hq + 3, d), generator=gen).to(DEVICE)
    q = q_big[:, 2:2 + hq]                                    # non-contiguous head stride
    meta = make_meta(num_blocks * hkv * ppb, d, "cuboid_mean", torch.float32, gen)
    out = torch.full((bsz, hkv, n_pages), float("nan"), device=DEVICE)
    scale = 0.3 if gqa_reduce == "mass" else None
    score_pages(q, meta, bt, num_full, selector="cuboid_mean", page_size=page, ppb=ppb, num_kv_heads=hkv, out=out,
                gqa_reduce=gqa_reduce, scale=scale, backend=backend)
    ref = ref_scores(q, meta, bt, num_full, "cuboid_mean", ppb, hkv, n_pages, gqa_reduce, scale)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-4)


def test_default_out_shape_and_bad_arguments():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn((1, 4, 64), generator=gen).to(DEVICE)
    bt = make_block_table(1, 3, 4, gen)
    nf = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    meta = make_meta(4 * 2 * 2, 64, "quest", torch.float32, gen)
    out = score_pages(q, meta, bt, nf, selector="quest", page_size=16, ppb=2, num_kv_heads=2)
    assert out.shape == (1, 2, 6) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="selector"):
        score_pages(q, meta, bt, nf, selector="topk", page_size=16, ppb=2, num_kv_heads=2)
    with pytest.raises(ValueError, match="meta"):
        score_pages(q, meta[:, :1], bt, nf, selector="quest", page_size=16, ppb=2, num_kv_heads=2)
    with pytest.raises(ValueError, match="gqa_reduce must be one of sum, max, mass, zmax"):
        score_pages(q, meta, bt, nf, selector="quest", page_size=16, ppb=2, num_kv_heads=2, gqa_reduce="mean")
    with pytest.raises(ValueError, match="mass.* needs the attention's softmax scale"):
        score_pages(q, meta, bt, nf, selector="quest", page_size=16, ppb=2, num_kv_heads=2, gqa_reduce="mass")
    with pytest.raises(ValueError, match="scale is used by gqa_reduce='mass' only"):
        score_pages(q, meta, bt, nf, selector="quest", page_size=16, ppb=2, num_kv_heads=2, scale=0.1)
    with pytest.raises(ValueError, match="scale is used by gqa_reduce='mass' only"):
        score_pages(q, meta, bt, nf, selector="quest", page_size=16, ppb=2, num_kv_heads=2, gqa_reduce="zmax",
                    scale=0.1)
    with pytest.raises(ValueError, match="head_scores is used by gqa_reduce='mass' and 'zmax' only"):
        score_pages(q, meta, bt, nf, selector="quest", page_size=16, ppb=2, num_kv_heads=2,
                    head_scores=torch.empty((1, 4, 6), device=DEVICE))
    with pytest.raises(ValueError, match="head_scores must be float32"):
        score_pages(q, meta, bt, nf, selector="quest", page_size=16, ppb=2, num_kv_heads=2, gqa_reduce="mass",
                    scale=0.1, head_scores=torch.empty((1, 4, 5), device=DEVICE))
    with pytest.raises(ValueError, match="num_kv_heads"):
        score_pages(q, meta, bt, nf, selector="quest", page_size=16, ppb=2, num_kv_heads=3)
    with pytest.raises(ValueError, match="out"):
        score_pages(q, meta, bt, nf, selector="quest", page_size=16, ppb=2, num_kv_heads=2,
                    out=torch.empty((1, 2, 7), device=DEVICE))
