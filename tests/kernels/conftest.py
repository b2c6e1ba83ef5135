"""Shared fixtures and independent float64 references for the sparse-decode kernel tests.

On a machine without CUDA the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` is set here, and
it must be set before ``triton`` is first imported (Triton's own library functions are wrapped at import), so
a session in which something imported triton earlier without it stops with an explicit error. On a CUDA machine
the same tests run the compiled kernels on the GPU. The references below are deliberately naive (Python loops,
dense masks, float64) and share no code with ``sparseserve_vllm.kernels``.
"""

from __future__ import annotations

import math
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("tests/kernels need TRITON_INTERPRET=1 before triton is first imported, but triton was "
                           "already imported without it; set it at the top of tests/conftest.py (CPU-only runs)")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("triton", "torch")


@pytest.fixture
def device() -> str:
    return DEVICE


def make_kv(num_blocks, hkv, block_size, d, dtype, gen, device=DEVICE):
    """Random KV cache ``(num_blocks, Hkv, block_size, 2D)``."""
    return torch.randn((num_blocks, hkv, block_size, 2 * d), generator=gen, dtype=torch.float32).to(device, dtype)


def make_block_table(bsz, max_blocks, num_blocks, gen, device=DEVICE):
    """Rows of distinct random block ids (blocks are never shared between requests)."""
    perm = torch.randperm(num_blocks, generator=gen)[: bsz * max_blocks]
    return perm.view(bsz, max_blocks).to(torch.int32).to(device)


def make_meta(n_pages, d, selector, dtype, gen, device=DEVICE):
    """Random but valid page metadata (quest: min <= max; cuboid radius >= 0)."""
    a = torch.randn((n_pages, d), generator=gen)
    if selector == "mean":
        return a.unsqueeze(1).to(device, dtype)
    b = torch.rand((n_pages, d), generator=gen)
    if selector == "quest":
        meta = torch.stack([a, a + b], 1)
    else:
        meta = torch.stack([a, b], 1)
    return meta.to(device, dtype)


def slot_of(bt_row, p, h, hkv, ppb):
    return (int(bt_row[p // ppb]) * hkv + h) * ppb + p % ppb


def ref_scores(q, meta, block_table, num_full, selector, ppb, hkv, n_pages, gqa_reduce="sum", scale=None):
    """float64 page scores by the literal per-head formulas, combined over each KV head's query heads: summed,
    maxed, (mass) the log of the summed per-head softmax over the request's full pages of `scale` x score, or
    (zmax) the maximum of each head's scores standardized over the request's full pages."""
    q = q.double().cpu()
    meta = meta.double().cpu()
    bt = block_table.cpu()
    bsz, hq, _ = q.shape
    g = hq // hkv
    out = torch.full((bsz, hkv, n_pages), float("-inf"), dtype=torch.float64)
    for b in range(bsz):
        for h in range(hkv):
            pages = range(min(int(num_full[b]), n_pages))
            per_head = {}  # (page, query head in group) -> score
            for p in pages:
                m = meta[slot_of(bt[b], p, h, hkv, ppb)]
                for j in range(g):
                    qq = q[b, h * g + j]
                    if selector == "quest":
                        per_head[p, j] = torch.maximum(qq * m[1], qq * m[0]).sum().item()
                    elif selector == "cuboid_mean":
                        per_head[p, j] = (qq @ m[0] + qq.abs() @ m[1]).item()
                    else:
                        per_head[p, j] = (qq @ m[0]).item()
            lse = {}  # log of each query head's softmax denominator over the full pages (mass)
            mean, std = {}, {}  # each query head's mean and standard deviation over the full pages (zmax)
            for j in range(g):
                if gqa_reduce == "mass" and pages:
                    top = max(scale * per_head[o, j] for o in pages)
                    lse[j] = top + math.log(sum(math.exp(scale * per_head[o, j] - top) for o in pages))
                if gqa_reduce == "zmax" and pages:
                    mean[j] = sum(per_head[o, j] for o in pages) / len(pages)
                    std[j] = max(math.sqrt(sum((per_head[o, j] - mean[j]) ** 2 for o in pages) / len(pages)), 1e-6)
            for p in pages:
                heads = [per_head[p, j] for j in range(g)]
                if gqa_reduce == "sum":
                    out[b, h, p] = sum(heads)
                elif gqa_reduce == "max":
                    out[b, h, p] = max(heads)
                elif gqa_reduce == "zmax":
                    out[b, h, p] = max((per_head[p, j] - mean[j]) / std[j] for j in range(g))
                else:
                    out[b, h, p] = math.log(sum(math.exp(scale * per_head[p, j] - lse[j]) for j in range(g)))
    return out


def ref_select(scores, seq_lens, page_size, num_select, sink, recent):
    """Page selection by the written rule, with Python sets and sorted()."""
    scores = scores.cpu()
    bsz, hkv, n_pages = scores.shape
    out = torch.full((bsz, hkv, num_select), -1, dtype=torch.int32)
    for b in range(bsz):
        sl = int(seq_lens[b])
        n, nf = math.ceil(sl / page_size), sl // page_size
        for h in range(hkv):
            if n <= num_select:
                chosen = list(range(n))
            else:
                forced = set(range(min(sink, nf))) | set(range(max(nf - recent, 0), nf))
                if sl % page_size:
                    forced.add(n - 1)
                def key(p):
                    v = float(scores[b, h, p])
                    return (-(v if v == v else float("-inf")), p)
                others = sorted((p for p in range(nf) if p not in forced), key=key)
                chosen = sorted(forced | set(others[: num_select - len(forced)]))
            out[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def ref_slots(page_idx, block_table, seq_lens, page_size, ppb, hkv):
    """(slots, page_lens) for logical page indices, element by element."""
    page_idx = page_idx.cpu()
    bt = block_table.cpu()
    slots = torch.zeros(page_idx.shape, dtype=torch.int32)
    lens = torch.zeros(page_idx.shape, dtype=torch.int32)
    bsz, _, k = page_idx.shape
    for b in range(bsz):
        for h in range(hkv):
            for i in range(k):
                p = int(page_idx[b, h, i])
                if p >= 0:
                    slots[b, h, i] = slot_of(bt[b], p, h, hkv, ppb)
                    lens[b, h, i] = max(0, min(page_size, int(seq_lens[b]) - p * page_size))
    return slots, lens


def ref_attention_pages(q, kv_pages, slots, page_lens, scale):
    """float64 softmax attention of each query head over the valid tokens of its KV head's listed pages."""
    q = q.double().cpu()
    kvp = kv_pages.double().cpu()
    slots, page_lens = slots.cpu(), page_lens.cpu()
    bsz, hq, d = q.shape
    hkv = slots.shape[1]
    g = hq // hkv
    out = torch.zeros((bsz, hq, d), dtype=torch.float64)
    for b in range(bsz):
        for h in range(hkv):
            toks = [kvp[int(s), t] for s, n in zip(slots[b, h], page_lens[b, h]) for t in range(int(n))]
            if not toks:
                continue
            kv = torch.stack(toks)
            for j in range(g):
                w = torch.softmax(kv[:, :d] @ q[b, h * g + j] * scale, 0)
                out[b, h * g + j] = w @ kv[:, d:]
    return out


def ref_dense_decode(q, kv_cache, block_table, seq_lens, scale):
    """float64 dense decode attention over all ``seq_len`` tokens, read from the raw (blocks, Hkv, bs, 2D) cache."""
    q = q.double().cpu()
    kv = kv_cache.double().cpu()
    bt = block_table.cpu()
    bsz, hq, d = q.shape
    hkv, bs = kv.shape[1], kv.shape[2]
    g = hq // hkv
    out = torch.zeros((bsz, hq, d), dtype=torch.float64)
    for b in range(bsz):
        sl = int(seq_lens[b])
        if sl == 0:
            continue
        t = torch.arange(sl)
        blocks = bt[b, (t // bs)].long()
        for h in range(hkv):
            tok = kv[blocks, h, t % bs]                                   # [sl, 2D]
            for j in range(g):
                w = torch.softmax(tok[:, :d] @ q[b, h * g + j] * scale, 0)
                out[b, h * g + j] = w @ tok[:, d:]
    return out
