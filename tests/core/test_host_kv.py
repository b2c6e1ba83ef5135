"""HostKVStore: layout identical to the HBM cache's, page views, size limits."""

from __future__ import annotations

import pytest
import torch

from sparseserve_vllm.core.host_kv import PINNABLE_FRACTION, HostKVStore, max_pinnable_bytes

PIN = torch.cuda.is_available()


def make_store(layers=3, blocks=6, heads=2, block_size=8, d=4, dtype=torch.bfloat16):
    store = HostKVStore(layers, blocks, heads, block_size, d, dtype, PIN)
    store.kv.copy_(torch.randn(store.kv.shape).to(dtype))
    return store


def test_shape_dtype_pinning_and_size():
    store = make_store()
    assert store.kv.shape == (3, 6, 2, 8, 8)
    assert store.kv.dtype == torch.bfloat16 and store.kv.is_contiguous()
    assert store.kv.device.type == "cpu" and store.kv.is_pinned() == PIN
    assert store.nbytes == 3 * 6 * 2 * 8 * 8 * 2
    assert store.nbytes == store.num_logical_blocks * HostKVStore.bytes_per_block(3, 2, 8, 4, torch.bfloat16)
    assert store.num_tokens == 48


@pytest.mark.parametrize("page_size", [1, 2, 4, 8])
def test_page_ids_follow_the_shared_layout(page_size):
    store = make_store()
    ppb = store.block_size // page_size
    for layer in range(store.num_layers):
        pages = store.pages(layer, page_size)
        assert pages.shape == (6 * 2 * ppb, page_size, 8)
        assert pages.data_ptr() == store.kv[layer].data_ptr()  # a view, never a copy
        for b in range(store.num_logical_blocks):
            for h in range(store.num_kv_heads):
                for j in range(ppb):
                    expected = store.kv[layer, b, h, j * page_size:(j + 1) * page_size]
                    assert torch.equal(pages[(b * 2 + h) * ppb + j], expected)


def test_pages_round_trip_with_an_hbm_cache():
    """A page moved HBM -> host -> other HBM slot keeps its K and V at the same (head, token) positions."""
    gen = torch.Generator().manual_seed(0)
    store = make_store(layers=2, blocks=5, heads=3, block_size=8, d=4, dtype=torch.float32)
    page_size, ppb, hkv, d = 4, 2, 3, 4
    hbm = torch.randn((4, hkv, 8, 2 * d), generator=gen)  # vLLM HND cache of one layer, 4 physical blocks
    hbm_pages = hbm.view(4 * hkv * ppb, page_size, 2 * d)
    host_pages = store.pages(1, page_size)
    moves = [((2, 1, 0), (3, 1, 0)), ((0, 2, 1), (4, 2, 1)), ((3, 0, 1), (0, 0, 1))]  # (hbm b,h,j) -> (host b,h,j)
    for (hb, h, j), (lb, _, _) in moves:
        host_pages[(lb * hkv + h) * ppb + j] = hbm_pages[(hb * hkv + h) * ppb + j]
    for (hb, h, j), (lb, _, _) in moves:
        toks = slice(j * page_size, (j + 1) * page_size)
        assert torch.equal(store.kv[1, lb, h, toks, :d], hbm[hb, h, toks, :d])  # K
        assert torch.equal(store.kv[1, lb, h, toks, d:], hbm[hb, h, toks, d:])  # V
    back = torch.full_like(hbm, float("nan"))
    back_pages = back.view(4 * hkv * ppb, page_size, 2 * d)
    for (hb, h, j), (lb, _, _) in moves:
        back_pages[(hb * hkv + h) * ppb + j] = host_pages[(lb * hkv + h) * ppb + j]
        toks = slice(j * page_size, (j + 1) * page_size)
        assert torch.equal(back[hb, h, toks], hbm[hb, h, toks])
    assert torch.isnan(back).sum() == back.numel() - len(moves) * page_size * 2 * d


def test_size_limit_names_host_kv_gib():
    with pytest.raises(ValueError, match="host_kv_gib"):
        HostKVStore(2, 100, 2, 16, 64, torch.float16, PIN, limit_bytes=1 << 20)
    HostKVStore(2, 4, 2, 16, 64, torch.float16, PIN, limit_bytes=1 << 20)  # 64 KiB fits


def test_default_limit_refuses_more_than_available_memory():
    too_many = max_pinnable_bytes() // HostKVStore.bytes_per_block(1, 1, 16, 64, torch.float16) + 1
    with pytest.raises(ValueError, match="host_kv_gib"):
        HostKVStore(1, too_many, 1, 16, 64, torch.float16, PIN)


def test_max_pinnable_bytes_reads_memavailable(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       134217728 kB\nMemFree:        1000 kB\nMemAvailable:   100000000 kB\n")
    assert max_pinnable_bytes(str(meminfo)) == int(100000000 * 1024 * PINNABLE_FRACTION)
    meminfo.write_text("MemTotal:       134217728 kB\n")
    with pytest.raises(ValueError, match="MemAvailable"):
        max_pinnable_bytes(str(meminfo))
    assert 0 < max_pinnable_bytes()


def test_blocks_for_gib():
    per_block = HostKVStore.bytes_per_block(32, 8, 128, 128, torch.bfloat16)
    assert per_block == 32 * 8 * 128 * 256 * 2
    assert HostKVStore.blocks_for_gib(1.0, 32, 8, 128, 128, torch.bfloat16) == (1 << 30) // per_block
    with pytest.raises(ValueError, match="host_kv_gib"):
        HostKVStore.blocks_for_gib(1e-6, 32, 8, 128, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="host_kv_gib"):
        HostKVStore.blocks_for_gib(0, 32, 8, 128, 128, torch.bfloat16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        HostKVStore(1, 1, 0, 16, 64, torch.float16, PIN)
    with pytest.raises(ValueError, match="dtype"):
        HostKVStore(1, 1, 1, 16, 64, torch.int64, PIN)
    with pytest.raises(ValueError, match="pin"):
        HostKVStore(1, 1, 1, 16, 64, torch.float16, 1)
    store = make_store()
    with pytest.raises(ValueError, match="page_size"):
        store.pages(0, 3)
    with pytest.raises(ValueError, match="layer"):
        store.pages(3, 4)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin=True needs CUDA"):
            HostKVStore(1, 1, 1, 16, 64, torch.float16, True)
