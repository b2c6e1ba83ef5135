"""FlashH2D (Triton UVA page gather and its torch path) against a float64 reference.

Without CUDA the kernel runs under TRITON_INTERPRET=1 with CPU tensors on both sides (set by conftest.py before
the kernel module is imported); with CUDA the source is pinned host memory and the destination is on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from sparseserve_vllm.kernels import flash_h2d as fh  # noqa: E402

from .conftest import DEVICE  # noqa: E402

SENTINEL = -1024.0  # exactly representable in every float dtype here; randn data never equals it


def make_src(num_pages, page_size, width, dtype, gen, offset_elems=0):
    """Random host page pool (pinned under CUDA); `offset_elems` shifts its base to test unaligned pools."""
    n = num_pages * page_size * width
    flat = torch.empty(n + offset_elems, dtype=dtype, pin_memory=DEVICE == "cuda")
    pages = flat[offset_elems:].view(num_pages, page_size, width)
    pages.copy_(torch.randn((num_pages, page_size, width), generator=gen).to(dtype))
    return pages


def make_ids(n, num_src, num_dst, gen, pad):
    """Random sources WITH repeats, distinct destinations, `pad` pairs with a -1 on one side."""
    src = torch.randint(0, num_src, (n,), generator=gen)
    src[: n // 2] = src[0]  # a repeated source for sure
    dst = torch.randperm(num_dst, generator=gen)[:n]
    for i in torch.randperm(n, generator=gen)[:pad].tolist():
        (src if i % 2 else dst)[i] = -1
    return src, dst


def reference(dst_before, src, src_ids, dst_ids):
    out = dst_before.double().cpu().clone()
    for s, d in zip(src_ids.tolist(), dst_ids.tolist()):
        if s >= 0 and d >= 0:
            out[d] = src[s].double().cpu()
    return out


CASES = [
    # (num_src, num_dst, n_pairs, page_size, width=2D, dtype, tile_bytes, offset_elems, expected geometry)
    (40, 24, 18, 8, 32, torch.bfloat16, 2048, 0, dict(PAGES_PER_TILE=4, CHUNKS_PER_PAGE=1, WORD_BYTES=8)),
    (30, 20, 13, 16, 64, torch.float16, 16384, 0, dict(PAGES_PER_TILE=8, CHUNKS_PER_PAGE=1, WORD_BYTES=8)),
    (25, 16, 12, 32, 64, torch.float32, 2048, 0, dict(PAGES_PER_TILE=1, CHUNKS_PER_PAGE=4, EVEN=True)),
    (20, 12, 9, 4, 24, torch.bfloat16, 64, 0, dict(CHUNK_WORDS=8, CHUNKS_PER_PAGE=3, EVEN=True)),
    (10, 6, 5, 12, 1024, torch.bfloat16, 16384, 0, dict(CHUNK_WORDS=1024, CHUNKS_PER_PAGE=3, EVEN=True)),  # 24 KiB
    (20, 12, 9, 3, 10, torch.float16, 64, 0, dict(PAGES_PER_TILE=1, EVEN=False, WORD_BYTES=4)),  # 60 B pages, tail mask
    (20, 12, 9, 3, 10, torch.float16, 16, 0, dict(CHUNKS_PER_PAGE=4, EVEN=False)),  # split pages with a tail mask
    (30, 20, 11, 8, 32, torch.bfloat16, 1024, 1, dict(WORD_BYTES=2)),  # unaligned host base
]


@pytest.mark.parametrize("num_sms", [1, 3, 64])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_float64_reference(case, num_sms):
    num_src, num_dst, n, page_size, width, dtype, tile_bytes, offset, geometry = case
    gen = torch.Generator().manual_seed(1000 * num_sms + CASES.index(case))
    src = make_src(num_src, page_size, width, dtype, gen, offset)
    dst = torch.full((num_dst, page_size, width), SENTINEL, dtype=dtype, device=DEVICE)
    src_ids, dst_ids = make_ids(n, num_src, num_dst, gen, pad=2)
    expected = reference(dst, src, src_ids, dst_ids)

    op = fh.FlashH2D(num_sms=num_sms, tile_bytes=tile_bytes).plan(src, dst)
    for key, value in geometry.items():  # the case exercises the kernel path it is meant to
        assert op.geometry[key] == value, (key, op.geometry)
    op.run(src_ids.to(DEVICE), dst_ids.to(DEVICE))
    assert torch.equal(dst.double().cpu(), expected)


def test_kernel_poisoned_with_nan_one_plan_many_runs():
    gen = torch.Generator().manual_seed(7)
    src = make_src(64, 16, 32, torch.bfloat16, gen)
    dst = torch.full((32, 16, 32), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    op = fh.FlashH2D(num_sms=2).plan(src, dst)
    source_of = {}
    for step in range(3):  # one plan, several runs with fresh ids (int64 and int32)
        src_ids, dst_ids = make_ids(6 + step, 64, 32, gen, pad=0)
        ids_dtype = torch.int32 if step % 2 else torch.int64
        op.run(src_ids.to(DEVICE, ids_dtype), dst_ids.to(DEVICE, ids_dtype))
        source_of.update(zip(dst_ids.tolist(), src_ids.tolist()))
    got = dst.double().cpu()
    assert 0 < len(source_of) < 32
    for d in range(32):
        if d in source_of:
            assert torch.equal(got[d], src[source_of[d]].double())
        else:
            assert torch.isnan(got[d]).all()


def test_torch_path_matches_reference():
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        src = torch.randn((50, 8, 16), generator=gen).to(dtype)
        dst = torch.full((30, 8, 16), SENTINEL, dtype=dtype)
        src_ids, dst_ids = make_ids(20, 50, 30, gen, pad=3)
        expected = reference(dst, src, src_ids, dst_ids)
        fh.flash_h2d_torch(src, dst, src_ids, dst_ids)
        assert torch.equal(dst.double(), expected)


def test_one_call_form_and_empty_batch():
    gen = torch.Generator().manual_seed(5)
    src = make_src(20, 8, 16, torch.float16, gen)
    dst = torch.full((10, 8, 16), SENTINEL, dtype=torch.float16, device=DEVICE)
    fh.flash_h2d(src, dst, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), num_sms=2)
    assert (dst == SENTINEL).all()
    src_ids, dst_ids = make_ids(7, 20, 10, gen, pad=1)
    expected = reference(dst, src, src_ids, dst_ids)
    fh.flash_h2d(src, dst, src_ids, dst_ids, num_sms=2)  # CPU ids: range-checked, then moved
    assert torch.equal(dst.double().cpu(), expected)


def test_validation_names_the_argument():
    src = make_src(10, 8, 16, torch.float16, torch.Generator().manual_seed(0))
    dst = torch.zeros((4, 8, 16), dtype=torch.float16, device=DEVICE)
    ids = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="dst_pages page shape"):
        fh.FlashH2D().plan(src, torch.zeros((4, 8, 8), dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="dst_pages dtype"):
        fh.FlashH2D().plan(src, dst.float())
    with pytest.raises(ValueError, match="src_pages must be C-contiguous"):
        fh.FlashH2D().plan(src.transpose(1, 2), dst)
    with pytest.raises(ValueError, match="src_pages must be a 3-D"):
        fh.FlashH2D().plan(src[0], dst)
    with pytest.raises(ValueError, match="num_sms"):
        fh.FlashH2D(num_sms=0)
    with pytest.raises(ValueError, match="tile_bytes"):
        fh.FlashH2D(tile_bytes=3000)
    op = fh.FlashH2D()
    with pytest.raises(ValueError, match="plan"):
        op.run(ids, ids)
    op.plan(src, dst)
    with pytest.raises(ValueError, match="src_ids must be < 10"):
        fh.flash_h2d(src, dst, torch.tensor([10, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dst_ids must be < 4"):
        fh.flash_h2d(src, dst, torch.tensor([1, 0]), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="one length"):
        op.run(ids.to(DEVICE), ids[:1].to(DEVICE))
    with pytest.raises(ValueError, match="dst_ids must be a 1-D int32 or int64"):
        op.run(ids.to(DEVICE), ids.float().to(DEVICE))
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="src_ids must be on"):
            op.run(ids, ids.to(DEVICE))
        with pytest.raises(ValueError, match="pinned"):
            fh.FlashH2D().plan(src.clone(), dst)  # pageable host memory
