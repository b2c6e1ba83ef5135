"""Page scoring for dynamic sparse decode: one criticality score per (request, KV head, logical page).

``score_pages(q, meta, block_table, num_full_pages, *, selector, page_size, ppb, num_kv_heads, out=None,
backend="auto")`` and its reference/CPU path ``score_pages_torch`` (same arguments, no ``backend``).

Inputs
  * ``q``: ``[B, Hq, D]`` bf16/fp16/fp32, last dim contiguous. Query heads ``h*G .. h*G+G-1`` (``G = Hq // Hkv``)
    belong to KV head ``h``.
  * ``meta``: ``[num_blocks*Hkv*ppb, M, D]`` (any float dtype, last dim contiguous) indexed by flat page slot id;
    ``M`` = 2 for ``quest`` (``[0]`` = per-dim min, ``[1]`` = max) and ``cuboid_mean`` (``[0]`` = centre,
    ``[1]`` = mean |k - centre|), 1 for ``mean``.
  * ``block_table``: ``[>= B, max_blocks]`` int32/int64; ``num_full_pages``: ``[>= B]`` int (``seq_len // page_size``).
  * ``out``: optional ``[B, Hkv, P]`` float32 with ``P <= max_blocks * ppb`` (default ``P = max_blocks * ppb``).

Output ``out[b, h, p]`` (float32, accumulated in fp32) for ``p < num_full_pages[b]`` is the sum over the G query
heads ``q`` of KV head ``h`` of the page score of page ``p`` (slot ``(block_table[b, p//ppb]*Hkv + h)*ppb + p%ppb``):
  * quest: ``sum_i max(q_i*max_i, q_i*min_i)``;  cuboid_mean: ``q.c + |q|.r``;  mean: ``q.m``.
``out[b, h, p] = -inf`` for ``p >= num_full_pages[b]``. Block-table entries of pages ``>= num_full_pages`` are never
read. All three scores are linear in per-head query vectors once the sign of ``q_i`` is known, so the G heads
are folded into two D-vectors before touching metadata (quest uses ``max(q*max, q*min) = max(q,0)*max +
min(q,0)*min``, exact whenever ``min <= max``, which ``build_page_metadata`` guarantees).

The Triton kernel runs one program per (request, block of ``BLOCK_P`` logical pages) covering ALL KV heads, so
with the shared layout it reads each vLLM block's metadata (``Hkv * ppb`` consecutive slots) as one contiguous
chunk, and every metadata row exactly once. It never synchronises with the host and allocates nothing when
``out`` is given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pages import num_meta_vectors, resolve_backend

SELECTOR_CODES = {"quest": 0, "cuboid_mean": 1, "mean": 2}
# Launch configuration (tuned on H200 by benchmarks/bench_sparse_decode.py --tune).
# tile_elems bounds BLOCK_P * Hkv * M * D (rounded to powers of two): the [pages, heads, M*D] tile per program.
SCORE_LAUNCH = {"tile_elems": 16384, "num_warps": 8}


def _validate(q, meta, block_table, num_full_pages, selector, page_size, ppb, num_kv_heads, out):
    m = num_meta_vectors(selector)
    for name, v in (("page_size", page_size), ("ppb", ppb), ("num_kv_heads", num_kv_heads)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if q.dim() != 3 or q.stride(-1) != 1:
        raise ValueError(f"q must be [B, Hq, D] with a contiguous last dim, got shape {tuple(q.shape)} "
                         f"strides {q.stride()}")
    bsz, hq, d = q.shape
    if hq % num_kv_heads != 0:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide the number of query heads {hq}")
    if meta.dim() != 3 or meta.shape[1] != m or meta.shape[2] != d or meta.stride(-1) != 1:
        raise ValueError(f"meta must be [num_pages, M={m}, D={d}] with a contiguous last dim for selector "
                         f"{selector!r}, got shape {tuple(meta.shape)} strides {meta.stride()}")
    if not meta.is_floating_point() or not q.is_floating_point():
        raise ValueError(f"q and meta must be floating point, got {q.dtype} and {meta.dtype}")
    if (block_table.dim() != 2 or block_table.shape[0] < bsz or block_table.stride(1) != 1
            or block_table.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"block_table must be int32/int64 [>= B={bsz}, max_blocks] with a contiguous last dim, "
                         f"got {block_table.dtype} {tuple(block_table.shape)}")
    if (num_full_pages.dim() != 1 or num_full_pages.shape[0] < bsz or num_full_pages.stride(0) != 1
            or num_full_pages.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"num_full_pages must be a contiguous int32/int64 tensor [>= B={bsz}], got "
                         f"{num_full_pages.dtype} {tuple(num_full_pages.shape)}")
    max_pages = block_table.shape[1] * ppb
    if out is None:
        out = torch.empty((bsz, num_kv_heads, max_pages), dtype=torch.float32, device=q.device)
    elif (out.dim() != 3 or out.shape[0] != bsz or out.shape[1] != num_kv_heads or out.shape[2] > max_pages
          or out.dtype != torch.float32 or out.stride(-1) != 1):
        raise ValueError(f"out must be float32 [B={bsz}, Hkv={num_kv_heads}, P <= {max_pages}] with a contiguous "
                         f"last dim, got {out.dtype} {tuple(out.shape)}")
    return out


def _query_vectors(qg: torch.Tensor, selector: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold the G query heads ``qg [B, Hkv, G, D]`` (fp32) into the vectors multiplying meta[0] and meta[1]."""
    if selector == "quest":
        return qg.clamp(max=0).sum(2), qg.clamp(min=0).sum(2)
    if selector == "cuboid_mean":
        return qg.sum(2), qg.abs().sum(2)
    return qg.sum(2), None


def gather_page_metadata(meta, block_table, num_full_pages, *, batch, num_kv_heads, ppb, num_pages):
    """Torch: the metadata rows of every (request, KV head, logical page) `[B, Hkv, P, M, D]` (fp32; pages at or past
    `num_full_pages` read slot 0) and the mask of the full pages `[B, 1, P]`."""
    p = torch.arange(num_pages, device=meta.device)
    blocks = block_table[:batch, p // ppb].long()                                  # [B, P]
    head = torch.arange(num_kv_heads, device=meta.device).view(1, num_kv_heads, 1)
    slots = (blocks.unsqueeze(1) * num_kv_heads + head) * ppb + (p % ppb)          # [B, Hkv, P]
    valid = (p.view(1, -1) < num_full_pages[:batch].long().view(-1, 1)).unsqueeze(1)  # [B, 1, P]
    return meta[torch.where(valid, slots, torch.zeros_like(slots))].float(), valid


def score_pages_torch(q, meta, block_table, num_full_pages, *, selector, page_size, ppb, num_kv_heads, out=None):
    """Pure-torch page scores (CPU path and reference semantics); see module docstring."""
    out = _validate(q, meta, block_table, num_full_pages, selector, page_size, ppb, num_kv_heads, out)
    bsz, hq, d = q.shape
    hkv = num_kv_heads
    pm, valid = gather_page_metadata(meta, block_table, num_full_pages, batch=bsz, num_kv_heads=hkv, ppb=ppb,
                                     num_pages=out.shape[2])
    a, b = _query_vectors(q.float().view(bsz, hkv, hq // hkv, d), selector)
    s = torch.einsum("bhpd,bhd->bhp", pm[..., 0, :], a)
    if b is not None:
        s = s + torch.einsum("bhpd,bhd->bhp", pm[..., 1, :], b)
    out.copy_(torch.where(valid, s, torch.full_like(s, float("-inf"))))
    return out


@triton.jit
def _score_pages_kernel(
    q_ptr, meta_ptr, bt_ptr, nf_ptr, out_ptr,
    stride_qb, stride_qh, stride_mn, stride_mm, stride_btb, stride_ob, stride_oh,
    n_pages, ppb,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, M: tl.constexpr, SELECTOR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_MD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    pid_p = tl.program_id(1)
    # Column j of a page's metadata row is meta[slot, j // D, j % D]; the query weights (the G heads of each KV
    # head folded by the selector's sign rule) are built directly in that layout.
    hh = tl.arange(0, BLOCK_H)
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_MD)
    hmask = hh < HKV
    jmask = j < M * D
    which = j // D
    col = j % D
    qe = tl.load(q_ptr + b * stride_qb + (hh[:, None, None] * G + g[None, :, None]) * stride_qh
                 + col[None, None, :],
                 mask=hmask[:, None, None] & (g < G)[None, :, None] & jmask[None, None, :],
                 other=0.0).to(tl.float32)                                          # [H, G, MD]
    first = (which == 0)[None, None, :]
    if SELECTOR == 0:
        w = tl.sum(tl.where(first, tl.minimum(qe, 0.0), tl.maximum(qe, 0.0)), axis=1)
    elif SELECTOR == 1:
        w = tl.sum(tl.where(first, qe, tl.abs(qe)), axis=1)
    else:
        w = tl.sum(qe, axis=1)                                                       # [H, MD]

    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    nf = tl.load(nf_ptr + b)
    valid = (p < nf) & (p < n_pages)
    blk = tl.load(bt_ptr + b * stride_btb + p // ppb, mask=valid, other=0).to(tl.int64)
    slot = (blk[:, None] * HKV + hh[None, :]) * ppb + (p % ppb)[:, None]            # [P, H]
    rows = meta_ptr + slot[:, :, None] * stride_mn + (which * stride_mm + col)[None, None, :]
    mt = tl.load(rows, mask=valid[:, None, None] & hmask[None, :, None] & jmask[None, None, :],
                 other=0.0).to(tl.float32)                                           # [P, H, MD]
    s = tl.sum(mt * w[None, :, :], axis=2)                                           # [P, H]
    s = tl.where(valid[:, None], s, float("-inf"))
    tl.store(out_ptr + b * stride_ob + hh[None, :] * stride_oh + p[:, None], s,
             mask=(p < n_pages)[:, None] & hmask[None, :])


def score_pages(q, meta, block_table, num_full_pages, *, selector, page_size, ppb, num_kv_heads, out=None,
                backend="auto"):
    """Page scores ``[B, Hkv, P]`` float32 (see module docstring); Triton on CUDA, torch on CPU by default."""
    if resolve_backend(backend, q) == "torch":
        return score_pages_torch(q, meta, block_table, num_full_pages, selector=selector, page_size=page_size,
                                 ppb=ppb, num_kv_heads=num_kv_heads, out=out)
    out = _validate(q, meta, block_table, num_full_pages, selector, page_size, ppb, num_kv_heads, out)
    bsz, hq, d = q.shape
    n_pages = out.shape[2]
    if bsz == 0 or n_pages == 0:
        return out
    g = hq // num_kv_heads
    block_h = triton.next_power_of_2(num_kv_heads)
    block_md = triton.next_power_of_2(meta.shape[1] * d)
    block_p = max(1, min(128, SCORE_LAUNCH["tile_elems"] // (block_h * block_md)))
    _score_pages_kernel[(bsz, triton.cdiv(n_pages, block_p))](
        q, meta, block_table, num_full_pages, out,
        q.stride(0), q.stride(1), meta.stride(0), meta.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1),
        n_pages, ppb,
        HKV=num_kv_heads, G=g, D=d, M=meta.shape[1], SELECTOR=SELECTOR_CODES[selector],
        BLOCK_H=block_h, BLOCK_G=triton.next_power_of_2(g), BLOCK_MD=block_md, BLOCK_P=block_p,
        num_warps=SCORE_LAUNCH["num_warps"],
    )
    return out
