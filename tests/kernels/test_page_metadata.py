"""build_page_metadata (Triton kernel and torch path) against float64 loops; unlisted slots stay untouched."""

import pytest
import torch

from sparseserve_vllm.kernels import build_page_metadata

from .conftest import BACKENDS, DEVICE


def _ref(keys, selector):
    keys = keys.double().cpu()
    if selector == "quest":
        return torch.stack([keys.min(0).values, keys.max(0).values])
    c = keys.mean(0)
    if selector == "mean":
        return c.unsqueeze(0)
    return torch.stack([c, (keys - c).abs().mean(0)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("selector,m", [("quest", 2), ("cuboid_mean", 2), ("mean", 1)])
@pytest.mark.parametrize("dtype,page,d", [(torch.float32, 16, 64), (torch.bfloat16, 32, 128),
                                          (torch.float16, 64, 64)])
def test_metadata_matches_reference(backend, selector, m, dtype, page, d):
    gen = torch.Generator().manual_seed(page + d + m)
    n = 12
    store = torch.randn((n, page, 2 * d + 16), generator=gen).to(DEVICE, dtype)
    kv_pages = store[..., 8:8 + 2 * d]                       # strided view, contiguous last dim
    meta = torch.full((n, m, d), float("nan"), dtype=dtype, device=DEVICE)
    slots = torch.tensor([3, -1, 0, 11, 7, -1], device=DEVICE)
    build_page_metadata(kv_pages, meta, slots, selector=selector, backend=backend)
    listed = {3, 0, 11, 7}
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for s in range(n):
        if s in listed:
            torch.testing.assert_close(meta[s].double().cpu(), _ref(kv_pages[s, :, :d], selector), **tol)
        else:
            assert torch.isnan(meta[s]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("selector,m", [("quest", 2), ("cuboid_mean", 2), ("mean", 1)])
def test_pages_read_from_src_slots_into_other_rows(backend, selector, m):
    """A page cache: page i is read from `kv_pages[src_slots[i]]` and digested into `meta[slots[i]]`, a meta of
    another row count; entries with either id -1 are skipped."""
    gen = torch.Generator().manual_seed(m)
    page, d, rows = 16, 64, 30
    kv_pages = torch.randn((8, page, 2 * d), generator=gen).to(DEVICE)
    meta = torch.full((rows, m, d), float("nan"), device=DEVICE)
    slots = torch.tensor([25, 2, -1, 17, 9], device=DEVICE)
    src = torch.tensor([3, -1, 5, 0, 7], device=DEVICE, dtype=torch.int32)
    build_page_metadata(kv_pages, meta, slots, selector=selector, src_slots=src, backend=backend)
    written = {25: 3, 17: 0, 9: 7}
    for r in range(rows):
        if r in written:
            torch.testing.assert_close(meta[r].double().cpu(), _ref(kv_pages[written[r], :, :d], selector),
                                       rtol=0, atol=1e-5)
        else:
            assert torch.isnan(meta[r]).all()


def test_bad_arguments():
    kv = torch.zeros((4, 16, 128), device=DEVICE)
    with pytest.raises(ValueError, match="meta"):
        build_page_metadata(kv, torch.zeros((4, 1, 64), device=DEVICE), torch.arange(2, device=DEVICE),
                            selector="quest")
    with pytest.raises(ValueError, match="slots"):
        build_page_metadata(kv, torch.zeros((4, 2, 64), device=DEVICE), torch.zeros((2, 2), device=DEVICE).long(),
                            selector="quest")
    with pytest.raises(ValueError, match="src_slots must have the length of slots"):
        build_page_metadata(kv, torch.zeros((9, 2, 64), device=DEVICE), torch.arange(2, device=DEVICE),
                            selector="quest", src_slots=torch.arange(3, device=DEVICE))
