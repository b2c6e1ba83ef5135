"""`token_pages` and `write_through` (kernels/write_through.py): the Triton kernels (under TRITON_INTERPRET=1 on a
machine without CUDA) and the torch path against a plain per-element Python reference on fresh random inputs, the
outputs poisoned first."""

from __future__ import annotations

import pytest
import torch

from sparseserve_vllm.kernels.write_through import token_pages, write_through

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def ref_token_pages(slot_mapping: list[int], block_size: int, page_size: int, hkv: int):
    pages, fresh = [], []
    for s in slot_mapping:
        for h in range(hkv):
            if s < 0:
                pages.append(-1)
                fresh.append(False)
            else:
                pages.append(((s // block_size) * hkv + h) * (block_size // page_size) + (s % block_size) // page_size)
                fresh.append(s % page_size == 0)
    return pages, fresh


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("t, hkv, block_size, page_size", [(1, 8, 128, 32), (37, 2, 16, 4), (300, 4, 64, 64)])
def test_token_pages_match_the_reference(backend, t, hkv, block_size, page_size):
    gen = torch.Generator().manual_seed(t * 31 + hkv)
    sm = torch.randint(0, 50 * block_size, (t,), generator=gen)
    sm[torch.rand(t, generator=gen) < 0.2] = -1
    sm[torch.rand(t, generator=gen) < 0.2] = (sm.clamp_min(0) // page_size * page_size)[0]  # some offset-0 tokens
    pages, fresh = token_pages(sm.to(DEV), block_size=block_size, page_size=page_size, num_kv_heads=hkv,
                               backend=backend)
    exp_pages, exp_fresh = ref_token_pages(sm.tolist(), block_size, page_size, hkv)
    assert pages.dtype == torch.int64 and fresh.dtype == torch.bool
    assert pages.tolist() == exp_pages and fresh.tolist() == exp_fresh


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("t, hkv, d, dtype", [(1, 8, 128, torch.bfloat16), (19, 2, 24, torch.float32),
                                              (64, 4, 64, torch.float16)])
def test_write_through_matches_the_reference(backend, t, hkv, d, dtype):
    gen = torch.Generator().manual_seed(t + d)
    ps, num_slots = 8, t * hkv + 8
    trash = num_slots - 1
    pool = torch.full((num_slots, ps, 2 * d), float("nan"), dtype=dtype)
    # key/value: strided views of one qkv-like buffer (as vLLM passes them), with rows past T
    # (values the pool's dtype holds exactly: the kernel copies, and the interpreter's bf16 rounding may differ)
    qkv = torch.randn(t + 3, 3 * hkv * d, generator=gen).to(dtype).float()
    key = qkv[:, hkv * d: 2 * hkv * d].view(t + 3, hkv, d)
    value = qkv[:, 2 * hkv * d:].view(t + 3, hkv, d)
    sm = torch.randperm(num_slots * ps, generator=gen)[:t]
    sm[torch.rand(t, generator=gen) < 0.2] = -1
    slots = torch.randperm(trash, generator=gen)[: t * hkv].to(torch.int32)
    slots[torch.rand(t * hkv, generator=gen) < 0.2] = -1  # pages left without a slot: the trash page
    slots.view(t, hkv)[sm < 0] = -1  # padding tokens have no slot
    expected = pool.clone()
    for i in range(t):
        for h in range(hkv):
            s = int(slots[i * hkv + h])
            if s >= 0:
                expected[s, int(sm[i]) % ps] = torch.cat((key[i, h], value[i, h])).to(dtype)
    out = pool.to(DEV)
    qkv = qkv.to(DEV)  # the same views on the device
    key, value = qkv[:, hkv * d: 2 * hkv * d].view(t + 3, hkv, d), qkv[:, 2 * hkv * d:].view(t + 3, hkv, d)
    assert not key.is_contiguous()
    write_through(out, key, value, sm.to(DEV), slots.to(DEV), page_size=ps, trash_slot=trash, backend=backend)
    out = out.cpu()
    torch.testing.assert_close(out[:trash], expected[:trash], rtol=0, atol=0, equal_nan=True)


def test_bad_arguments_name_the_setting():
    pool = torch.zeros(4, 8, 16)
    kv = torch.zeros(2, 1, 8)
    with pytest.raises(ValueError, match="cache_pages must be"):
        write_through(pool, torch.zeros(2, 1, 4), torch.zeros(2, 1, 4), torch.zeros(2, dtype=torch.long),
                      torch.zeros(2, dtype=torch.int32), page_size=8, trash_slot=3)
    with pytest.raises(ValueError, match="slots"):
        write_through(pool, kv, kv, torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.int32), page_size=8,
                      trash_slot=3)
    with pytest.raises(ValueError, match="slot_mapping must be a 1-D"):
        token_pages(torch.zeros(2, 2, dtype=torch.long), block_size=16, page_size=8, num_kv_heads=1)
    with pytest.raises(ValueError, match="multiple of page_size"):
        token_pages(torch.zeros(2, dtype=torch.long), block_size=12, page_size=8, num_kv_heads=1)
