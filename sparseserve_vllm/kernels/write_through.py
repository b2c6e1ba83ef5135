"""Write-through of a step's new KV into the HBM page cache (`OffloadTier.write_new`): one Triton launch per part.

Contract (T tokens, Hkv KV heads, D head dim; `backend` "triton" (CUDA, or the CPU under `TRITON_INTERPRET=1`) or
"torch", the reference with the same results):
- `token_pages(slot_mapping, *, block_size, page_size, num_kv_heads, backend)`: `slot_mapping` 1-D int [T] of
  token slots (`block * block_size + offset`, -1 = padding) -> `(pages, fresh)`, int64 and bool [T * Hkv],
  token-major: entry `t * Hkv + h` is the logical flat page `(block * Hkv + h) * ppb + offset // page_size` of
  token t's KV head h (ppb = block_size // page_size), -1 for padding; `fresh` marks the tokens at offset 0 of their
  page (a page whose first token arrives in this write has no older tokens).
- `write_through(cache_pages, key, value, slot_mapping, slots, *, page_size, trash_slot, backend)`: for every token t
  and head h, `cache_pages[s, slot_mapping[t] % page_size] = cat(key[t, h], value[t, h])` cast to the pool's dtype,
  where `s = slots[t * Hkv + h]`, or `trash_slot` when that is -1 (a page left without a cache slot, or padding,
  whose slots are -1: padding tokens write some row of the trash page). `cache_pages` is the C-contiguous
  pool `(num_slots, page_size, 2D)`; `key`/`value` `[>= T, Hkv, D]` with unit stride in D (rows past T are ignored);
  `slots` int32/int64 [T * Hkv].
Both run without host synchronization and allocate only their outputs (CUDA-graph capturable for fixed T).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pages import resolve_backend

__all__ = ["token_pages", "write_through"]

_BLOCK = 1024


@triton.jit
def _token_pages_kernel(slot_mapping_ptr, n, pages_ptr, fresh_ptr, block_size, page_size, ppb,
                        HKV: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    sm = tl.load(slot_mapping_ptr + offs // HKV, mask=m, other=-1).to(tl.int64)
    head = offs % HKV
    real = sm >= 0
    page = ((sm // block_size) * HKV + head) * ppb + (sm % block_size) // page_size
    tl.store(pages_ptr + offs, tl.where(real, page, -1), mask=m)
    tl.store(fresh_ptr + offs, (real & (sm % page_size == 0)).to(tl.int8), mask=m)


@triton.jit
def _write_through_kernel(key_ptr, value_ptr, k_stride_t, k_stride_h, v_stride_t, v_stride_h, slot_mapping_ptr,
                          slots_ptr, cache_ptr, page_size, trash_slot, HKV: tl.constexpr, D: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    i = tl.program_id(0)  # entry t * HKV + h
    t = i // HKV
    h = i % HKV
    sm = tl.load(slot_mapping_ptr + t).to(tl.int64)
    off = tl.where(sm >= 0, sm % page_size, 0)  # (C-style % of -1 would be -1: the row before the page)
    s = tl.load(slots_ptr + i).to(tl.int64)
    s = tl.where(s < 0, trash_slot, s)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    row = cache_ptr + (s * page_size + off) * (2 * D)
    k = tl.load(key_ptr + t * k_stride_t + h * k_stride_h + d, mask=dm)
    v = tl.load(value_ptr + t * v_stride_t + h * v_stride_h + d, mask=dm)
    tl.store(row + d, k.to(cache_ptr.dtype.element_ty), mask=dm)
    tl.store(row + D + d, v.to(cache_ptr.dtype.element_ty), mask=dm)


def token_pages(slot_mapping: torch.Tensor, *, block_size: int, page_size: int, num_kv_heads: int,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Logical flat pages and fresh flags of every (token, KV head) of `slot_mapping` (see the module docstring)."""
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be a 1-D int32 or int64 tensor, got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    if block_size % page_size:
        raise ValueError(f"block_size ({block_size}) must be a multiple of page_size ({page_size})")
    t, h = slot_mapping.numel(), num_kv_heads
    if resolve_backend(backend, slot_mapping) == "torch":
        sm = slot_mapping.to(torch.int64)[:, None]
        heads = torch.arange(h, device=sm.device)[None, :]
        page = ((sm // block_size) * h + heads) * (block_size // page_size) + (sm % block_size) // page_size
        real = sm >= 0
        return torch.where(real, page, -1).reshape(-1), (real & (sm % page_size == 0)).expand(t, h).reshape(-1)
    pages = torch.empty(t * h, dtype=torch.int64, device=slot_mapping.device)
    fresh = torch.empty(t * h, dtype=torch.bool, device=slot_mapping.device)
    if t:
        _token_pages_kernel[(triton.cdiv(t * h, _BLOCK),)](
            slot_mapping.contiguous(), t * h, pages, fresh.view(torch.int8), block_size, page_size,
            block_size // page_size, HKV=h, BLOCK=_BLOCK)
    return pages, fresh


def write_through(cache_pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                  slots: torch.Tensor, *, page_size: int, trash_slot: int, backend: str = "auto") -> None:
    """Write the new tokens' K and V into their cache pages (see the module docstring)."""
    t = slot_mapping.numel()
    h, d = key.shape[1], key.shape[2]
    if cache_pages.dim() != 3 or cache_pages.shape[1] != page_size or cache_pages.shape[2] != 2 * d:
        raise ValueError(f"cache_pages must be (num_slots, {page_size}, {2 * d}), got {tuple(cache_pages.shape)}")
    if key.shape[0] < t or value.shape[:2] != key.shape[:2] or value.shape[2] != d or slots.numel() != t * h:
        raise ValueError(f"key/value must be [>= {t}, Hkv, D] alike and slots [T * Hkv]; got key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}, slots {tuple(slots.shape)}")
    if t == 0:
        return
    if resolve_backend(backend, cache_pages) == "torch":
        dst = torch.where(slots < 0, trash_slot, slots.to(torch.int64)).view(t, h)
        off = (slot_mapping.to(torch.int64) % page_size)[:, None]
        cache_pages.index_put_((dst, off), torch.cat((key[:t], value[:t]), dim=-1).to(cache_pages.dtype))
        return
    if not cache_pages.is_contiguous():
        raise ValueError("cache_pages must be C-contiguous")
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    _write_through_kernel[(t * h,)](
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1), slot_mapping.contiguous(),
        slots.contiguous(), cache_pages, page_size, trash_slot, HKV=h, D=d, BLOCK_D=triton.next_power_of_2(d))
