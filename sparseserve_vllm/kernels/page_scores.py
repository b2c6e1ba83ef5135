"""Page scoring for dynamic sparse decode: one criticality score per (request, KV head, logical page).

``score_pages(q, meta, block_table, num_full_pages, *, selector, page_size, ppb, num_kv_heads, gqa_reduce="sum",
scale=None, head_scores=None, out=None, backend="auto")`` and its reference/CPU path ``score_pages_torch`` (same
arguments, no ``backend``), built on ``head_page_scores`` (torch: every query head's ``s_g(p)`` below, unreduced).

Inputs
  * ``q``: ``[B, Hq, D]`` bf16/fp16/fp32, last dim contiguous. Query heads ``h*G .. h*G+G-1`` (``G = Hq // Hkv``)
    belong to KV head ``h``.
  * ``meta``: ``[num_blocks*Hkv*ppb, M, D]`` (any float dtype, last dim contiguous) indexed by flat page slot id;
    ``M`` = 2 for ``quest`` (``[0]`` = per-dim min, ``[1]`` = max) and ``cuboid_mean`` (``[0]`` = centre,
    ``[1]`` = mean |k - centre|), 1 for ``mean``.
  * ``block_table``: ``[>= B, max_blocks]`` int32/int64; ``num_full_pages``: ``[>= B]`` int (``seq_len // page_size``).
  * ``gqa_reduce``: ``"sum"``, ``"max"``, ``"mass"`` or ``"zmax"``, how the G query heads of a KV head combine their
    page scores.
  * ``scale``: the attention's softmax scale, required by ``"mass"`` and refused by the others.
  * ``head_scores``: ``"mass"`` and ``"zmax"`` only, optional float32 workspace ``[>= B, Hq, P]`` with a contiguous
    last dim (the Triton path's per-head scores; allocated when not given).
  * ``out``: optional ``[B, Hkv, P]`` float32 with ``P <= max_blocks * ppb`` (default ``P = max_blocks * ppb``).

With ``s_g(p)`` the page score of page ``p`` (slot ``(block_table[b, p//ppb]*Hkv + h)*ppb + p%ppb``) for query head
``g`` of KV head ``h``:
  * quest: ``sum_i max(q_i*max_i, q_i*min_i)``;  cuboid_mean: ``q.c + |q|.r``;  mean: ``q.m``,
the output ``out[b, h, p]`` (float32, accumulated in fp32) for ``p < num_full_pages[b]`` is
  * ``"sum"``: ``sum_g s_g(p)``;  ``"max"``: ``max_g s_g(p)``;
  * ``"mass"``: ``log sum_g softmax_p(scale * s_g)(p)``, the log of the attention mass the group's heads would put
    on the page if ``s_g`` were its keys' logits (each head's softmax over the request's full pages);
  * ``"zmax"``: ``max_g (s_g(p) - mu_g) / max(sigma_g, 1e-6)``, with ``mu_g`` and ``sigma_g`` the mean and standard
    deviation of ``s_g`` over the request's full pages: each head's scores on a common scale before the maximum,
    so that no head decides the group's selection by the size of its scores alone (nearly the union of the heads'
    own top lists, at the cost of two more passes over per-head scores instead of a sort);
``out[b, h, p] = -inf`` for ``p >= num_full_pages[b]``. Block-table entries of pages ``>= num_full_pages`` are never
read. All three scores are linear in per-head query vectors once the sign of ``q_i`` is known, so with ``"sum"`` the
G heads are folded into two D-vectors before touching metadata (quest uses ``max(q*max, q*min) = max(q,0)*max +
min(q,0)*min``, exact whenever ``min <= max``, which ``build_page_metadata`` guarantees); with ``"max"``,
``"mass"`` and ``"zmax"`` each head is scored against the same metadata: per KV head one matrix product of its
pages' metadata rows ``[BLOCK_P, M*D]`` and the group's weight rows (padded to 16 heads) on the tensor cores (in
the inputs' 16-bit dtype when q and meta share it, where the weights are exact; else fp32 at tf32x3 precision; the
same bytes read as ``"sum"``); ``"mass"`` and ``"zmax"`` write the per-head scores (``"mass"``: scaled) to
``head_scores`` and a second kernel (one program per request and KV head) writes ``out``: for ``"mass"`` two passes
over the pages (each head's log-sum-exp online, then the log of the summed probabilities), for ``"zmax"`` three
(means, deviations, the maximum standardized score). The torch path does the same with two ``logsumexp``
reductions, or mean and standard deviation.

The Triton kernel runs one program per (request, block of ``BLOCK_P`` logical pages) covering ALL KV heads
(``SCORE_LAUNCH`` sizes ``"sum"``'s tile, ``SCORE_LAUNCH_PER_HEAD`` the others'), so
with the shared layout it reads each vLLM block's metadata (``Hkv * ppb`` consecutive slots) as one contiguous
chunk, and every metadata row exactly once. A block past the request's full pages (the grid is sized for the
longest context the plan allows) only writes ``-inf``, so the scoring follows the batch's contexts (the combining
kernels of ``"mass"`` and ``"zmax"`` still read all ``P`` columns). It never synchronises with the host and
allocates nothing when ``out`` (and, for ``"mass"`` and ``"zmax"``, ``head_scores``) is given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import GQA_REDUCES
from .pages import num_meta_vectors, resolve_backend, triton_interpreting

SELECTOR_CODES = {"quest": 0, "cuboid_mean": 1, "mean": 2}
REDUCE_CODES = {"sum": 0, "max": 1, "mass": 2, "zmax": 3}
PER_HEAD_REDUCES = ("mass", "zmax")  # they combine per-head scores held in `head_scores` (a second kernel)
ZMAX_MIN_STD = 1e-6  # the smallest standard deviation "zmax" divides by (a head whose pages all score alike)
# Launch configuration (tuned on H200 by benchmarks/bench_sparse_decode.py --tune).
# tile_elems bounds BLOCK_P * Hkv * M * D (rounded to powers of two): the [pages, heads, M*D] tile per program.
SCORE_LAUNCH = {"tile_elems": 16384, "num_warps": 8}
# The per-head reductions ("max", "mass", "zmax"): tile_elems bounds BLOCK_P * M * D, one KV head's tile.
SCORE_LAUNCH_PER_HEAD = {"tile_elems": 16384, "num_warps": 4}


def check_gqa_reduce(gqa_reduce) -> None:
    """ValueError naming the allowed values unless ``gqa_reduce`` is one of them."""
    if gqa_reduce not in GQA_REDUCES:
        raise ValueError(f"gqa_reduce must be one of {', '.join(GQA_REDUCES)}, got {gqa_reduce!r}")


def _validate(q, meta, block_table, num_full_pages, selector, page_size, ppb, num_kv_heads, out, gqa_reduce="sum",
              scale=None, head_scores=None):
    m = num_meta_vectors(selector)
    check_gqa_reduce(gqa_reduce)
    if gqa_reduce == "mass" and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"gqa_reduce='mass' needs the attention's softmax scale (a number > 0), got scale={scale!r}")
    if gqa_reduce != "mass" and scale is not None:
        raise ValueError(f"scale is used by gqa_reduce='mass' only, got scale={scale!r} with gqa_reduce={gqa_reduce!r}")
    if gqa_reduce not in PER_HEAD_REDUCES and head_scores is not None:
        raise ValueError(f"head_scores is used by gqa_reduce='mass' and 'zmax' only, got a tensor with "
                         f"gqa_reduce={gqa_reduce!r}")
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
    if head_scores is not None and (
            head_scores.dim() != 3 or head_scores.shape[0] < bsz or head_scores.shape[1] != hq
            or head_scores.shape[2] < out.shape[2] or head_scores.dtype != torch.float32
            or head_scores.stride(-1) != 1):
        raise ValueError(f"head_scores must be float32 [>= B={bsz}, Hq={hq}, >= P={out.shape[2]}] with a contiguous "
                         f"last dim, got {head_scores.dtype} {tuple(head_scores.shape)}")
    return out


def _query_vectors(qg: torch.Tensor, selector: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The vectors multiplying meta[0] and meta[1] for query heads ``qg [..., D]`` (fp32)."""
    if selector == "quest":
        return qg.clamp(max=0), qg.clamp(min=0)
    if selector == "cuboid_mean":
        return qg, qg.abs()
    return qg, None


def _gather_page_metadata(meta, block_table, num_full_pages, *, batch, num_kv_heads, ppb, num_pages):
    """Torch: the metadata rows of every (request, KV head, logical page) `[B, Hkv, P, M, D]` (fp32; pages at or past
    `num_full_pages` read slot 0) and the mask of the full pages `[B, 1, P]`."""
    p = torch.arange(num_pages, device=meta.device)
    blocks = block_table[:batch, p // ppb].long()                                  # [B, P]
    head = torch.arange(num_kv_heads, device=meta.device).view(1, num_kv_heads, 1)
    slots = (blocks.unsqueeze(1) * num_kv_heads + head) * ppb + (p % ppb)          # [B, Hkv, P]
    valid = (p.view(1, -1) < num_full_pages[:batch].long().view(-1, 1)).unsqueeze(1)  # [B, 1, P]
    return meta[torch.where(valid, slots, torch.zeros_like(slots))].float(), valid


def _combine_mass(head_scores: torch.Tensor, num_kv_heads: int, out: torch.Tensor) -> torch.Tensor:
    """``out [B, Hkv, P] = log sum_g softmax_p(head_scores)`` for scaled per-head scores ``[B, Hq, P]`` (-inf on pages
    that are not full; a request without full pages gets -inf everywhere, never NaN)."""
    z = head_scores.unflatten(1, (num_kv_heads, -1))                                # [B, Hkv, G, P]
    lse = torch.logsumexp(z, dim=3, keepdim=True).clamp_(min=torch.finfo(torch.float32).min)
    return torch.logsumexp(z - lse, dim=2, out=out)


def _combine_zmax(s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [B, Hkv, P] = max_g`` of each head's standardized scores, from per-head scores ``s [B, Hkv, G, P]``
    (-inf on pages that are not full, which stay -inf)."""
    valid = s > float("-inf")
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    x = torch.where(valid, s, 0.0)
    mean = x.sum(-1, keepdim=True) / n
    std = (torch.where(valid, x - mean, 0.0).square().sum(-1, keepdim=True) / n).sqrt().clamp_min(ZMAX_MIN_STD)
    return out.copy_(torch.where(valid, (x - mean) / std, float("-inf")).amax(2))


def score_pages_torch(q, meta, block_table, num_full_pages, *, selector, page_size, ppb, num_kv_heads,
                      gqa_reduce="sum", scale=None, head_scores=None, out=None):
    """Pure-torch page scores (CPU path and reference semantics); see module docstring."""
    out = _validate(q, meta, block_table, num_full_pages, selector, page_size, ppb, num_kv_heads, out, gqa_reduce,
                    scale, head_scores)
    s = head_page_scores(q, meta, block_table, num_full_pages, selector=selector, ppb=ppb,
                         num_kv_heads=num_kv_heads, num_pages=out.shape[2], fold=gqa_reduce == "sum")
    if gqa_reduce == "mass":
        return _combine_mass((s * scale).flatten(1, 2), num_kv_heads, out)
    if gqa_reduce == "zmax":
        return _combine_zmax(s, out)
    return out.copy_(s.amax(2) if gqa_reduce == "max" else s.squeeze(2))


def head_page_scores(q, meta, block_table, num_full_pages, *, selector, ppb, num_kv_heads, num_pages,
                     fold=False) -> torch.Tensor:
    """Torch: each query head's score of every page, ``[B, Hkv, G, P]`` fp32, -inf on pages that are not full;
    `fold`: the group's heads summed first (``[B, Hkv, 1, P]``, the `sum` reduction: one D-vector per metadata
    row). Arguments as `score_pages_torch`'s, unchecked."""
    bsz, hq, d = q.shape
    pm, valid = _gather_page_metadata(meta, block_table, num_full_pages, batch=bsz, num_kv_heads=num_kv_heads,
                                      ppb=ppb, num_pages=num_pages)
    a, b = _query_vectors(q.float().view(bsz, num_kv_heads, hq // num_kv_heads, d), selector)   # [B, Hkv, G, D]
    if fold:
        a, b = a.sum(2, keepdim=True), (None if b is None else b.sum(2, keepdim=True))
    s = torch.einsum("bhpd,bhgd->bhgp", pm[..., 0, :], a)
    if b is not None:
        s = s + torch.einsum("bhpd,bhgd->bhgp", pm[..., 1, :], b)
    return torch.where(valid.unsqueeze(2), s, float("-inf"))


@triton.jit
def _query_weights(qe, first, SELECTOR: tl.constexpr):
    """A query head's weights in the metadata row's layout (column j multiplies meta[slot, j // D, j % D])."""
    if SELECTOR == 0:
        return tl.where(first, tl.minimum(qe, 0.0), tl.maximum(qe, 0.0))
    elif SELECTOR == 1:
        return tl.where(first, qe, tl.abs(qe))
    else:
        return qe


@triton.jit
def _score_page_block(q_ptr, meta_ptr, bt_ptr, out_ptr, stride_qb, stride_qh, stride_mn, stride_mm, stride_btb,
                      stride_ob, stride_oh, n_pages, ppb, b, p, nf, hh, hmask, jmask, which, col, HKV: tl.constexpr,
                      G: tl.constexpr, SELECTOR: tl.constexpr, BLOCK_G: tl.constexpr):
    """`sum` scores of the block of pages `p` of request `b`, which holds at least one full page."""
    valid = (p < nf) & (p < n_pages)
    blk = tl.load(bt_ptr + b * stride_btb + p // ppb, mask=valid, other=0).to(tl.int64)
    slot = (blk[:, None] * HKV + hh[None, :]) * ppb + (p % ppb)[:, None]            # [P, H]
    rows = meta_ptr + slot[:, :, None] * stride_mn + (which * stride_mm + col)[None, None, :]
    mt = tl.load(rows, mask=valid[:, None, None] & hmask[None, :, None] & jmask[None, None, :],
                 other=0.0).to(tl.float32)                                           # [P, H, MD]
    q_row = q_ptr + b * stride_qb + col
    # The G heads of each KV head folded by the selector's sign rule into one weight row.
    g = tl.arange(0, BLOCK_G)
    qe = tl.load(q_row[None, None, :] + (hh[:, None, None] * G + g[None, :, None]) * stride_qh,
                 mask=hmask[:, None, None] & (g < G)[None, :, None] & jmask[None, None, :],
                 other=0.0).to(tl.float32)                                          # [H, G, MD]
    w = tl.sum(_query_weights(qe, (which == 0)[None, None, :], SELECTOR), axis=1)       # [H, MD]
    s = tl.sum(mt * w[None, :, :], axis=2)                                           # [P, H]
    s = tl.where(valid[:, None], s, float("-inf"))
    tl.store(out_ptr + b * stride_ob + hh[None, :] * stride_oh + p[:, None], s,
             mask=(p < n_pages)[:, None] & hmask[None, :])


@triton.jit
def _score_page_block_per_head(q_ptr, meta_ptr, bt_ptr, out_ptr, head_ptr, stride_qb, stride_qh, stride_mn,
                               stride_mm, stride_btb, stride_ob, stride_oh, stride_hb, stride_hh, n_pages, ppb,
                               scale, b, p, nf, hh, hmask, jmask, which, col, HKV: tl.constexpr,
                               G: tl.constexpr, SELECTOR: tl.constexpr, REDUCE: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_GD: tl.constexpr,
                               DOT_NATIVE: tl.constexpr):
    """Every query head's score of the block of pages `p` of request `b` (which holds at least one full page): per
    KV head one matrix product `meta rows [P, M*D] x weights [M*D, G]` on the tensor cores (the group padded to
    BLOCK_GD >= 16 columns). `max` (REDUCE 1) keeps the group's maximum in `out`; `mass` (2) and `zmax` (3) store the
    per-head scores (x scale) in `head_ptr` for the combining kernel. DOT_NATIVE: q and meta share a 16-bit dtype,
    in which the weights (q, |q| or its signed parts) are exact, so the product runs in it (fp32 accumulation, exact
    products); otherwise in fp32 at tf32x3 precision."""
    valid = (p < nf) & (p < n_pages)
    blk = tl.load(bt_ptr + b * stride_btb + p // ppb, mask=valid, other=0).to(tl.int64)
    gd = tl.arange(0, BLOCK_GD)
    gmask = gd < G
    q_row = q_ptr + b * stride_qb + col
    s = tl.full((BLOCK_P, BLOCK_H), float("-inf"), tl.float32)
    for h in tl.static_range(HKV):
        slot = (blk * HKV + h) * ppb + p % ppb                                       # [P]
        mt = tl.load(meta_ptr + slot[:, None] * stride_mn + (which * stride_mm + col)[None, :],
                     mask=valid[:, None] & jmask[None, :], other=0.0)                # [P, MD]
        qe = tl.load(q_row[None, :] + (h * G + gd)[:, None] * stride_qh, mask=gmask[:, None] & jmask[None, :],
                     other=0.0).to(tl.float32)                                       # [GD, MD]
        w = _query_weights(qe, (which == 0)[None, :], SELECTOR)
        if DOT_NATIVE:
            sg = tl.dot(mt, tl.trans(w.to(mt.dtype)))                                # [P, GD] fp32
        else:
            sg = tl.dot(mt.to(tl.float32), tl.trans(w), input_precision="tf32x3")
        if REDUCE == 1:
            top = tl.max(tl.where(gmask[None, :], sg, float("-inf")), axis=1)        # [P]
            s = tl.where(hh[None, :] == h, top[:, None], s)
        else:
            tl.store(head_ptr + b * stride_hb + (h * G + gd)[None, :] * stride_hh + p[:, None],
                     tl.where(valid[:, None], sg * scale, float("-inf")),
                     mask=(p < n_pages)[:, None] & gmask[None, :])
    if REDUCE == 1:
        tl.store(out_ptr + b * stride_ob + hh[None, :] * stride_oh + p[:, None],
                 tl.where(valid[:, None], s, float("-inf")), mask=(p < n_pages)[:, None] & hmask[None, :])


@triton.jit
def _score_pages_kernel(
    q_ptr, meta_ptr, bt_ptr, nf_ptr, out_ptr, head_ptr,
    stride_qb, stride_qh, stride_mn, stride_mm, stride_btb, stride_ob, stride_oh, stride_hb, stride_hh,
    n_pages, ppb, scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, M: tl.constexpr, SELECTOR: tl.constexpr,
    REDUCE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_MD: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_GD: tl.constexpr, DOT_NATIVE: tl.constexpr,
):
    b = tl.program_id(0)
    pid_p = tl.program_id(1)
    hh = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_MD)
    hmask = hh < HKV
    jmask = j < M * D
    which = j // D
    col = j % D

    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    nf = tl.load(nf_ptr + b)
    if pid_p * BLOCK_P >= nf:
        # No full page in this block (a plan sized for the longest context, a shorter request): -inf, nothing read.
        dead = tl.full((BLOCK_P, BLOCK_H), float("-inf"), tl.float32)
        if REDUCE >= 2:
            for gi in tl.static_range(G):
                tl.store(head_ptr + b * stride_hb + (hh[None, :] * G + gi) * stride_hh + p[:, None], dead,
                         mask=(p < n_pages)[:, None] & hmask[None, :])
        else:
            tl.store(out_ptr + b * stride_ob + hh[None, :] * stride_oh + p[:, None], dead,
                     mask=(p < n_pages)[:, None] & hmask[None, :])
    elif REDUCE == 0:
        _score_page_block(q_ptr, meta_ptr, bt_ptr, out_ptr, stride_qb, stride_qh, stride_mn, stride_mm, stride_btb,
                          stride_ob, stride_oh, n_pages, ppb, b, p, nf, hh, hmask, jmask, which, col, HKV, G,
                          SELECTOR, BLOCK_G)
    else:
        _score_page_block_per_head(q_ptr, meta_ptr, bt_ptr, out_ptr, head_ptr, stride_qb, stride_qh, stride_mn,
                                   stride_mm, stride_btb, stride_ob, stride_oh, stride_hb, stride_hh, n_pages, ppb,
                                   scale, b, p, nf, hh, hmask, jmask, which, col, HKV, G, SELECTOR, REDUCE,
                                   BLOCK_P, BLOCK_H, BLOCK_GD, DOT_NATIVE)


@triton.jit
def _head_block(rows, start, n_pages, gmask, BLOCK_P: tl.constexpr):
    """Pages `start ..` of the group's per-head score rows: (page ids [BLOCK_P], scores [BLOCK_G, BLOCK_P], -inf
    past `n_pages` and on padding heads)."""
    p = start + tl.arange(0, BLOCK_P)
    return p, tl.load(rows + p[None, :], mask=gmask[:, None] & (p < n_pages)[None, :], other=float("-inf"))


@triton.jit
def _combine_mass_kernel(head_ptr, out_ptr, stride_hb, stride_hh, stride_ob, stride_oh, n_pages,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[b, h, p] = log sum_g softmax_p(head[b, h*G + g, :])(p), in the log domain (see `_combine_mass`)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    rows = head_ptr + b * stride_hb + (h * G + g)[:, None] * stride_hh
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    for start in range(0, n_pages, BLOCK_P):  # each head's running max and sum of exp over the pages
        p, z = _head_block(rows, start, n_pages, gmask, BLOCK_P)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), axis=1)
        m = m_new
    lse = tl.where(m == float("-inf"), 0.0, m + tl.log(l))  # a head without full pages: every z is -inf
    for start in range(0, n_pages, BLOCK_P):
        p, z = _head_block(rows, start, n_pages, gmask, BLOCK_P)
        a = z - lse[:, None]                                                         # log-probabilities [G, P]
        top = tl.max(a, axis=0)
        top_ref = tl.where(top == float("-inf"), 0.0, top)
        res = top_ref + tl.log(tl.sum(tl.exp(a - top_ref[None, :]), axis=0))
        tl.store(out_ptr + b * stride_ob + h * stride_oh + p, tl.where(top == float("-inf"), top, res),
                 mask=p < n_pages)


@triton.jit
def _combine_zmax_kernel(head_ptr, out_ptr, stride_hb, stride_hh, stride_ob, stride_oh, n_pages, min_std,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[b, h, p] = max_g (head[b, h*G + g, p] - mean_g) / max(std_g, min_std) over the full pages (see
    `_combine_zmax`): the means, the deviations, then the maximum, three passes over the pages."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    rows = head_ptr + b * stride_hb + (h * G + g)[:, None] * stride_hh
    n = tl.zeros((BLOCK_G,), tl.float32)
    total = tl.zeros((BLOCK_G,), tl.float32)
    for start in range(0, n_pages, BLOCK_P):
        p, z = _head_block(rows, start, n_pages, gmask, BLOCK_P)
        full = z > float("-inf")
        n += tl.sum(full.to(tl.float32), axis=1)
        total += tl.sum(tl.where(full, z, 0.0), axis=1)
    mean = total / tl.maximum(n, 1.0)
    dev = tl.zeros((BLOCK_G,), tl.float32)
    for start in range(0, n_pages, BLOCK_P):
        p, z = _head_block(rows, start, n_pages, gmask, BLOCK_P)
        d = tl.where(z > float("-inf"), z - mean[:, None], 0.0)
        dev += tl.sum(d * d, axis=1)
    std = tl.maximum(tl.sqrt(dev / tl.maximum(n, 1.0)), min_std)
    for start in range(0, n_pages, BLOCK_P):
        p, z = _head_block(rows, start, n_pages, gmask, BLOCK_P)
        t = tl.where(z > float("-inf"), (z - mean[:, None]) / std[:, None], float("-inf"))
        tl.store(out_ptr + b * stride_ob + h * stride_oh + p, tl.max(t, axis=0), mask=p < n_pages)


def _native_dot_dtypes() -> tuple:
    """The 16-bit dtypes whose matrix product the per-head scoring uses natively: the interpreter (numpy) has no
    bfloat16 product, so there bf16 takes the fp32 path (the native one is tested on a GPU)."""
    return (torch.float16,) if triton_interpreting() else (torch.bfloat16, torch.float16)


def score_pages(q, meta, block_table, num_full_pages, *, selector, page_size, ppb, num_kv_heads, gqa_reduce="sum",
                scale=None, head_scores=None, out=None, backend="auto"):
    """Page scores ``[B, Hkv, P]`` float32 (see module docstring); Triton on CUDA, torch on CPU by default."""
    if resolve_backend(backend, q) == "torch":
        return score_pages_torch(q, meta, block_table, num_full_pages, selector=selector, page_size=page_size,
                                 ppb=ppb, num_kv_heads=num_kv_heads, gqa_reduce=gqa_reduce, scale=scale,
                                 head_scores=head_scores, out=out)
    out = _validate(q, meta, block_table, num_full_pages, selector, page_size, ppb, num_kv_heads, out, gqa_reduce,
                    scale, head_scores)
    bsz, hq, d = q.shape
    n_pages = out.shape[2]
    if bsz == 0 or n_pages == 0:
        return out
    if gqa_reduce in PER_HEAD_REDUCES:
        if head_scores is None:
            head_scores = torch.empty((bsz, hq, n_pages), dtype=torch.float32, device=q.device)
        head_scores = head_scores[:bsz, :, :n_pages]
    g = hq // num_kv_heads
    block_h = triton.next_power_of_2(num_kv_heads)
    block_md = max(16, triton.next_power_of_2(meta.shape[1] * d))
    if gqa_reduce == "sum":  # a [pages, heads, M*D] tile
        launch = SCORE_LAUNCH
        block_p = max(1, min(128, launch["tile_elems"] // (block_h * block_md)))
    else:  # one [pages, M*D] tile per KV head, a matrix product (>= 16 rows)
        launch = SCORE_LAUNCH_PER_HEAD
        block_p = max(16, min(128, launch["tile_elems"] // block_md))
    head = out if head_scores is None else head_scores
    native = q.dtype == meta.dtype and q.dtype in _native_dot_dtypes()
    _score_pages_kernel[(bsz, triton.cdiv(n_pages, block_p))](
        q, meta, block_table, num_full_pages, out, head,
        q.stride(0), q.stride(1), meta.stride(0), meta.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1), head.stride(0), head.stride(1),
        n_pages, ppb, float(scale or 1.0),
        HKV=num_kv_heads, G=g, D=d, M=meta.shape[1], SELECTOR=SELECTOR_CODES[selector],
        REDUCE=REDUCE_CODES[gqa_reduce],
        BLOCK_H=block_h, BLOCK_G=triton.next_power_of_2(g), BLOCK_MD=block_md, BLOCK_P=block_p,
        BLOCK_GD=max(16, triton.next_power_of_2(g)), DOT_NATIVE=native,
        num_warps=launch["num_warps"],
    )
    combine_block_p = max(16, min(1024, 4096 // triton.next_power_of_2(g)))
    if gqa_reduce == "mass":
        _combine_mass_kernel[(bsz, num_kv_heads)](
            head_scores, out, head_scores.stride(0), head_scores.stride(1), out.stride(0), out.stride(1), n_pages,
            G=g, BLOCK_G=triton.next_power_of_2(g), BLOCK_P=combine_block_p, num_warps=4,
        )
    elif gqa_reduce == "zmax":
        _combine_zmax_kernel[(bsz, num_kv_heads)](
            head_scores, out, head_scores.stride(0), head_scores.stride(1), out.stride(0), out.stride(1), n_pages,
            ZMAX_MIN_STD, G=g, BLOCK_G=triton.next_power_of_2(g), BLOCK_P=combine_block_p, num_warps=4,
        )
    return out
