"""Paged sparse decode attention over selected KV pages (one query token per request).

``sparse_decode_attention(q, kv_pages, slots, page_lens, *, scale, out=None, num_splits=1, workspace=None,
backend="auto")``; reference/CPU path ``sparse_decode_attention_torch(q, kv_pages, slots, page_lens, *, scale,
out=None)``; ``choose_num_splits(...)`` is the split-K heuristic used by plan(); ``alloc_split_workspace(...)``
allocates the split-K scratch buffers.

Inputs
  * ``q`` ``[B, Hq, D]`` bf16/fp16/fp32, last dim contiguous; query heads ``h*G .. h*G+G-1`` use KV head ``h``.
  * ``kv_pages`` ``[N, page_size, 2D]`` (any strides with a contiguous last dim; the flat page view of a layer's
    cache): ``K = kv_pages[..., :D]``, ``V = kv_pages[..., D:]``; same dtype as ``q``.
  * ``slots``, ``page_lens`` ``[B, Hkv, K]`` int32 (contiguous): flat page ids and the number of valid leading
    tokens of each page (``0`` = padding entry; its slot must still be a valid page id, e.g. 0).
  * ``out`` ``[B, Hq, D]`` (optional, same dtype as ``q``, last dim contiguous).

Output: ``out[b, hq] = softmax(scale * q K^T) V`` over the valid tokens of the selected pages of ``hq``'s KV head,
in fp32 (online softmax), cast to ``out.dtype``; a row with zero valid tokens gets zeros.

Triton kernel: one program per (request, KV head, split). The program holds the whole GQA group (G query heads
padded to ``>= 16`` rows for ``tl.dot``) so that each K/V page is read from HBM once per group; it walks its
share of the selected pages ``TILE_TOKENS // page_size`` pages at a time (``attn_launch(page_size)``). With
``num_splits > 1`` each split writes an fp32 partial output and its log-sum-exp (base 2) to ``workspace``, and a
second kernel merges the splits. Nothing is allocated and nothing synchronises with the host when ``out`` (and
``workspace`` for ``num_splits > 1``) are given. Under ``TRITON_INTERPRET=1`` bf16 ``tl.dot`` operands are widened
to fp32 first (the Triton 3.6 interpreter multiplies bf16 as raw uint16); bf16 x bf16 products are exact in fp32,
so the numerics match the compiled bf16 path (probabilities are still rounded to bf16 before the PV product).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .pages import resolve_backend, triton_interpreting

# Launch configurations by page size (tuned on the H200 by benchmarks/bench_sparse_decode.py --tune; batch 64 x 32K,
# budget 2048): pages of up to 32 tokens go 64 tokens a tile; pages of 64 tokens or more 128 tokens a tile with
# 8 warps (64-token pages: 131 us a step against 160 us at 64 tokens a tile and 4 warps).
ATTN_LAUNCH = {"TILE_TOKENS": 64, "num_warps": 4, "num_stages": 2}
ATTN_LAUNCH_LARGE_PAGES = {"TILE_TOKENS": 128, "num_warps": 8, "num_stages": 2}
LARGE_PAGE_TOKENS = 64
LOG2E = 1.4426950408889634


def attn_launch(page_size: int) -> dict:
    """The launch configuration (a module dict: the tuner updates it in place) for pages of `page_size` tokens."""
    return ATTN_LAUNCH_LARGE_PAGES if page_size >= LARGE_PAGE_TOKENS else ATTN_LAUNCH


def _validate(q, kv_pages, slots, page_lens, out):
    if q.dim() != 3 or q.stride(-1) != 1 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be fp16/bf16/fp32 [B, Hq, D] with a contiguous last dim, got {q.dtype} "
                         f"{tuple(q.shape)} strides {q.stride()}")
    bsz, hq, d = q.shape
    if kv_pages.dim() != 3 or kv_pages.shape[2] != 2 * d or kv_pages.stride(-1) != 1 or kv_pages.dtype != q.dtype:
        raise ValueError(f"kv_pages must be {q.dtype} [N, page_size, 2*D={2 * d}] with a contiguous last dim, got "
                         f"{kv_pages.dtype} {tuple(kv_pages.shape)} strides {kv_pages.stride()}")
    if slots.dim() != 3 or slots.shape[0] != bsz or hq % max(slots.shape[1], 1) != 0:
        raise ValueError(f"slots must be [B={bsz}, Hkv, K] with Hkv dividing Hq={hq}, got {tuple(slots.shape)}")
    for name, t in (("slots", slots), ("page_lens", page_lens)):
        if t.shape != slots.shape or t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 tensor of shape {tuple(slots.shape)}, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} with a contiguous last dim, got {out.dtype} "
                         f"{tuple(out.shape)}")
    return out


def sparse_decode_attention_torch(q, kv_pages, slots, page_lens, *, scale, out=None):
    """Pure-torch sparse decode attention (CPU path and reference semantics); see module docstring."""
    out = _validate(q, kv_pages, slots, page_lens, out)
    bsz, hq, d = q.shape
    hkv, k = slots.shape[1], slots.shape[2]
    page_size = kv_pages.shape[1]
    pages = kv_pages[slots.long()].float()                                         # [B, Hkv, K, T, 2D]
    keys = pages[..., :d].reshape(bsz, hkv, k * page_size, d)
    vals = pages[..., d:].reshape(bsz, hkv, k * page_size, d)
    tok = torch.arange(page_size, device=q.device)
    valid = (tok.view(1, 1, 1, -1) < page_lens.unsqueeze(-1)).reshape(bsz, hkv, 1, k * page_size)
    qg = q.float().view(bsz, hkv, hq // hkv, d)
    logits = torch.einsum("bhgd,bhnd->bhgn", qg, keys) * scale
    logits = logits.masked_fill(~valid, float("-inf"))
    mx = logits.amax(-1, keepdim=True)
    p = torch.exp(logits - torch.where(torch.isinf(mx), torch.zeros_like(mx), mx))
    denom = p.sum(-1, keepdim=True)
    o = torch.einsum("bhgn,bhnd->bhgd", p, vals) / torch.where(denom == 0, torch.ones_like(denom), denom)
    out.copy_(o.reshape(bsz, hq, d))
    return out


@triton.jit
def _sparse_decode_kernel(
    q_ptr, kv_ptr, slots_ptr, lens_ptr, out_ptr, po_ptr, plse_ptr,
    qk_scale,
    stride_qb, stride_qh, stride_kvn, stride_kvt, stride_ob, stride_oh,
    num_kv_heads, num_pages_sel, pages_per_split, num_splits,
    G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, PAGES_PER_TILE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    TILE: tl.constexpr = PAGES_PER_TILE * PAGE

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < G
    dmask = d < D
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    kv_dtype = q.dtype
    if UPCAST_DOT:
        q = q.to(tl.float32)

    t = tl.arange(0, TILE)
    t_page = t // PAGE
    t_tok = t % PAGE
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    row = pid_bh.to(tl.int64) * num_pages_sel
    k_begin = split * pages_per_split
    k_end = tl.minimum(k_begin + pages_per_split, num_pages_sel)
    for k0 in range(k_begin, k_end, PAGES_PER_TILE):
        kidx = k0 + t_page
        kmask = kidx < k_end
        slot = tl.load(slots_ptr + row + kidx, mask=kmask, other=0).to(tl.int64)
        plen = tl.load(lens_ptr + row + kidx, mask=kmask, other=0)
        valid = kmask & (t_tok < plen)
        tok_ptr = kv_ptr + slot * stride_kvn + t_tok * stride_kvt
        lmask = valid[:, None] & dmask[None, :]
        kt = tl.load(tok_ptr[:, None] + d[None, :], mask=lmask, other=0.0)
        vt = tl.load(tok_ptr[:, None] + D + d[None, :], mask=lmask, other=0.0)
        if UPCAST_DOT:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision="ieee") * qk_scale      # [BLOCK_G, TILE], log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv_dtype).to(vt.dtype), vt, input_precision="ieee")
        m_i = m_new

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    hq = h * G + g
    if SPLIT:
        # partial buffers: po [B*Hq, num_splits, D] fp32, plse [B*Hq, num_splits] (log2 domain)
        prow = (b * num_kv_heads * G + hq).to(tl.int64) * num_splits + split
        tl.store(po_ptr + prow[:, None] * D + d[None, :], o, mask=gmask[:, None] & dmask[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(plse_ptr + prow, lse, mask=gmask)
    else:
        tl.store(out_ptr + b * stride_ob + hq[:, None] * stride_oh + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _merge_splits_kernel(
    po_ptr, plse_ptr, out_ptr, stride_ob, stride_oh, num_q_heads, num_splits,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)                       # b * Hq + hq
    b = pid // num_q_heads
    hq = pid % num_q_heads
    sidx = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = sidx < num_splits
    base = pid.to(tl.int64) * num_splits
    lse = tl.load(plse_ptr + base + sidx, mask=smask, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx))
    po = tl.load(po_ptr + (base + sidx)[:, None] * D + d[None, :], mask=smask[:, None] & (d < D)[None, :],
                 other=0.0)
    tot = tl.sum(w, axis=0)
    o = tl.sum(po * w[:, None], axis=0) / tl.where(tot == 0.0, 1.0, tot)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def choose_num_splits(batch_size: int, num_kv_heads: int, num_select: int, num_sms: int) -> int:
    """Split-K factor: enough programs for ~2 waves of ``num_sms`` SMs, each split keeping >= 8 pages."""
    programs = max(batch_size * num_kv_heads, 1)
    want = math.ceil(2 * num_sms / programs)
    return max(1, min(want, num_select // 8, 16))


def alloc_split_workspace(batch_size: int, num_q_heads: int, head_dim: int, num_splits: int,
                          device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial outputs ``[B*Hq, S, D]`` and partial log2-sum-exp ``[B*Hq, S]`` for split-K."""
    return (torch.empty((batch_size * num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device),
            torch.empty((batch_size * num_q_heads, num_splits), dtype=torch.float32, device=device))


def sparse_decode_attention(q, kv_pages, slots, page_lens, *, scale, out=None, num_splits=1, workspace=None,
                            backend="auto"):
    """Sparse decode attention output ``[B, Hq, D]`` (see module docstring)."""
    if resolve_backend(backend, q) == "torch":
        return sparse_decode_attention_torch(q, kv_pages, slots, page_lens, scale=scale, out=out)
    out = _validate(q, kv_pages, slots, page_lens, out)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    bsz, hq, d = q.shape
    hkv, k = slots.shape[1], slots.shape[2]
    page_size = kv_pages.shape[1]
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"kv_pages page_size (dim 1) must be a power of two, got {page_size}")
    if bsz == 0:
        return out
    g = hq // hkv
    num_splits = max(1, min(num_splits, k))
    split = num_splits > 1
    if split:
        if workspace is None:
            workspace = alloc_split_workspace(bsz, hq, d, num_splits, q.device)
        po, plse = workspace
        if (po.dtype != torch.float32 or plse.dtype != torch.float32 or not po.is_contiguous()
                or not plse.is_contiguous() or po.numel() < bsz * hq * num_splits * d
                or plse.numel() < bsz * hq * num_splits):
            raise ValueError(f"workspace must be contiguous fp32 tensors with >= {bsz * hq * num_splits * d} and "
                             f">= {bsz * hq * num_splits} elements (see alloc_split_workspace)")
    else:
        po, plse = out, out
    launch = attn_launch(page_size)
    pages_per_tile = max(1, launch["TILE_TOKENS"] // page_size)
    pages_per_split = triton.cdiv(k, num_splits)
    block_d = triton.next_power_of_2(d)
    _sparse_decode_kernel[(bsz * hkv, num_splits)](
        q, kv_pages, slots, page_lens, out, po, plse,
        float(scale) * LOG2E,
        q.stride(0), q.stride(1), kv_pages.stride(0), kv_pages.stride(1), out.stride(0), out.stride(1),
        hkv, k, pages_per_split, num_splits,
        G=g, D=d, PAGE=page_size, PAGES_PER_TILE=pages_per_tile,
        BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_D=block_d, SPLIT=split,
        UPCAST_DOT=q.dtype == torch.bfloat16 and triton_interpreting(),
        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )
    if split:
        _merge_splits_kernel[(bsz * hq,)](
            po, plse, out, out.stride(0), out.stride(1), hq, num_splits,
            D=d, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=4,
        )
    return out
