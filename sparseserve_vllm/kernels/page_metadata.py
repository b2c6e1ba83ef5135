"""Page metadata (selector digests) for pages that just became full.

``build_page_metadata(kv_pages, meta, slots, *, selector, src_slots=None, backend="auto")``; reference/CPU path
``build_page_metadata_torch(kv_pages, meta, slots, *, selector, src_slots=None)``.

Inputs
  * ``kv_pages`` ``[N, page_size, 2D]`` (flat page view, any strides with a contiguous last dim); keys are
    ``kv_pages[..., :D]``. Every listed page must be FULL (all ``page_size`` tokens written).
  * ``meta`` ``[N, M, D]`` float tensor (contiguous last dim), written in place at the listed slots only.
  * ``slots`` 1-D int32/int64 flat page ids; entries ``< 0`` are skipped (so a fixed-size, ``-1``-padded buffer
    can be passed under CUDA graphs on the Triton path).
  * ``src_slots`` (optional) 1-D int32/int64, one per entry of ``slots``: the page of entry ``i`` is read from
    ``kv_pages[src_slots[i]]`` instead of ``kv_pages[slots[i]]`` (a page cache: ``kv_pages`` holds cache slots, ``meta``
    rows are logical pages, and ``meta`` may have any number of rows); entries with ``src_slots[i] < 0`` are
    skipped too.

Written, computed in fp32 from the page's keys ``k [page_size, D]`` and cast to ``meta.dtype``:
  * ``quest``: ``meta[s, 0] = min_t k``, ``meta[s, 1] = max_t k`` (per dim);
  * ``cuboid_mean``: ``meta[s, 0] = c = mean_t k``, ``meta[s, 1] = mean_t |k - c|``;
  * ``mean``: ``meta[s, 0] = mean_t k``.

The Triton kernel runs one program per listed slot, reads the page's keys once and never synchronises with the
host. The torch path indexes with a boolean mask (a host sync), which is fine on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .page_scores import SELECTOR_CODES
from .pages import num_meta_vectors, resolve_backend


def _validate(kv_pages, meta, slots, selector, src_slots=None):
    m = num_meta_vectors(selector)
    if kv_pages.dim() != 3 or kv_pages.stride(-1) != 1 or kv_pages.shape[2] % 2:
        raise ValueError(f"kv_pages must be [N, page_size, 2*D] with a contiguous last dim, got "
                         f"{tuple(kv_pages.shape)} strides {kv_pages.stride()}")
    d = kv_pages.shape[2] // 2
    rows_ok = src_slots is not None or meta.shape[0] == kv_pages.shape[0]
    if (meta.dim() != 3 or not rows_ok or meta.shape[1] != m or meta.shape[2] != d
            or meta.stride(-1) != 1 or not meta.is_floating_point()):
        raise ValueError(f"meta must be a float tensor [N={kv_pages.shape[0]} (any with src_slots), M={m}, D={d}] with "
                         f"a contiguous last dim for selector {selector!r}, got {meta.dtype} {tuple(meta.shape)}")
    for name, ids in (("slots", slots), ("src_slots", slots if src_slots is None else src_slots)):
        if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64) or ids.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous 1-D int32/int64 tensor, got {ids.dtype} "
                             f"{tuple(ids.shape)}")
    if src_slots is not None and src_slots.shape != slots.shape:
        raise ValueError(f"src_slots must have the length of slots ({slots.numel()}), got {src_slots.numel()}")
    return d


def build_page_metadata_torch(kv_pages, meta, slots, *, selector, src_slots=None):
    """Pure-torch metadata build (CPU path and reference semantics); see module docstring."""
    d = _validate(kv_pages, meta, slots, selector, src_slots)
    src = slots if src_slots is None else src_slots
    keep = (slots >= 0) & (src >= 0)
    s = slots[keep].long()
    keys = kv_pages[src[keep].long(), :, :d].float()                                 # [n, T, D]
    if selector == "quest":
        meta[s, 0] = keys.amin(1).to(meta.dtype)
        meta[s, 1] = keys.amax(1).to(meta.dtype)
    else:
        centre = keys.mean(1)
        meta[s, 0] = centre.to(meta.dtype)
        if selector == "cuboid_mean":
            meta[s, 1] = (keys - centre.unsqueeze(1)).abs().mean(1).to(meta.dtype)
    return meta


@triton.jit
def _build_meta_kernel(
    kv_ptr, meta_ptr, slots_ptr, src_ptr, stride_kvn, stride_kvt, stride_mn, stride_mm,
    PAGE: tl.constexpr, D: tl.constexpr, SELECTOR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    slot = tl.load(slots_ptr + tl.program_id(0)).to(tl.int64)
    src = tl.load(src_ptr + tl.program_id(0)).to(tl.int64)  # src_ptr is slots_ptr without src_slots
    ok = (slot >= 0) & (src >= 0)
    slot = tl.where(ok, slot, 0)
    src = tl.where(ok, src, 0)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tmask = t < PAGE
    dmask = d < D
    lmask = (tmask[:, None] & dmask[None, :]) & ok
    keys = tl.load(kv_ptr + src * stride_kvn + t[:, None] * stride_kvt + d[None, :], mask=lmask,
                   other=0.0).to(tl.float32)
    dst = meta_ptr + slot * stride_mn + d
    smask = dmask & ok
    if SELECTOR == 0:
        lo = tl.min(tl.where(tmask[:, None], keys, float("inf")), axis=0)
        hi = tl.max(tl.where(tmask[:, None], keys, float("-inf")), axis=0)
        tl.store(dst, lo.to(meta_ptr.dtype.element_ty), mask=smask)
        tl.store(dst + stride_mm, hi.to(meta_ptr.dtype.element_ty), mask=smask)
    else:
        centre = tl.sum(keys, axis=0) / PAGE
        tl.store(dst, centre.to(meta_ptr.dtype.element_ty), mask=smask)
        if SELECTOR == 1:
            dev = tl.where(tmask[:, None], tl.abs(keys - centre[None, :]), 0.0)
            tl.store(dst + stride_mm, (tl.sum(dev, axis=0) / PAGE).to(meta_ptr.dtype.element_ty), mask=smask)


def build_page_metadata(kv_pages, meta, slots, *, selector, src_slots=None, backend="auto"):
    """Write the ``selector`` digest of each listed full page into ``meta`` (see module docstring)."""
    if resolve_backend(backend, kv_pages) == "torch":
        return build_page_metadata_torch(kv_pages, meta, slots, selector=selector, src_slots=src_slots)
    d = _validate(kv_pages, meta, slots, selector, src_slots)
    if slots.numel() == 0:
        return meta
    page = kv_pages.shape[1]
    _build_meta_kernel[(slots.numel(),)](
        kv_pages, meta, slots, slots if src_slots is None else src_slots, kv_pages.stride(0), kv_pages.stride(1),
        meta.stride(0), meta.stride(1),
        PAGE=page, D=d, SELECTOR=SELECTOR_CODES[selector],
        BLOCK_T=triton.next_power_of_2(page), BLOCK_D=triton.next_power_of_2(d), num_warps=4,
    )
    return meta
