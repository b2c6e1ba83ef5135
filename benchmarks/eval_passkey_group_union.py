"""Experiment: `eval_passkey_cpu.py` with a GQA group's selection made from its query heads' own page orders.

Not a product setting. A KV head's one selection is usually made from one score per page that combines its query
heads' scores (`gqa_reduce`: `sum`, `max` of raw scores, `mass`). Here each query head's scores are first put on a
common scale, then the group takes the best over its heads, so one head with large raw scores no longer decides
the selection alone (`--union`):
  rank  a page's group score is its best rank over the heads (ties: the higher raw score), so the group's top-k is
        the round-robin union of the heads' own top lists;
  zmax  each head's scores standardized over the request's full pages (minus their mean, over their standard
        deviation), then the maximum over the heads: a rank union that assumes every head's scores have the same
        shape of distribution, computable with one pass of statistics per head instead of a sort.
It replaces the torch scoring path's `max` for this process only (`--gqa-reduce max` selects it); the Triton
kernels are untouched. The other arguments are `eval_passkey_cpu.py`'s.

    python benchmarks/eval_passkey_group_union.py --union rank --placements 40 --selectors quest --budgets 2048 \
        --gqa-reduce max --out benchmarks/results/passkey-smollm2-cpu-quest-40-rank-union.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eval_passkey_cpu  # noqa: E402

from sparseserve_vllm.kernels import page_scores  # noqa: E402

_score_pages_torch = page_scores.score_pages_torch


def rank_union(s: torch.Tensor) -> torch.Tensor:
    """Group scores `[B, Hkv, P]` from per-head scores `[B, Hkv, G, P]`: the best rank (see module docstring)."""
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1]).expand_as(order))
    return -rank.min(2).values.float() + 1e-3 * torch.tanh(1e-3 * s.amax(2))      # best rank; ties: raw score


def zscore_max(s: torch.Tensor) -> torch.Tensor:
    """Group scores `[B, Hkv, P]` from per-head scores `[B, Hkv, G, P]`: the best standardized score."""
    valid = s > float("-inf")
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    x = torch.where(valid, s, 0.0)
    mean = x.sum(-1, keepdim=True) / n
    std = (torch.where(valid, (x - mean) ** 2, 0.0).sum(-1, keepdim=True) / n).sqrt().clamp_min(1e-6)
    return ((x - mean) / std).amax(2)


UNIONS = {"rank": rank_union, "zmax": zscore_max}


def group_union_scores(union, q, meta, block_table, num_full_pages, *, selector, page_size, ppb, num_kv_heads,
                       gqa_reduce="sum", scale=None, head_scores=None, out=None):
    """`score_pages_torch`, with `gqa_reduce="max"` meaning `union` (module docstring)."""
    if gqa_reduce != "max":
        return _score_pages_torch(q, meta, block_table, num_full_pages, selector=selector, page_size=page_size,
                                  ppb=ppb, num_kv_heads=num_kv_heads, gqa_reduce=gqa_reduce, scale=scale,
                                  head_scores=head_scores, out=out)
    out = page_scores._validate(q, meta, block_table, num_full_pages, selector, page_size, ppb, num_kv_heads, out,
                                gqa_reduce)
    s = page_scores.head_page_scores(q, meta, block_table, num_full_pages, selector=selector, ppb=ppb,
                                     num_kv_heads=num_kv_heads, num_pages=out.shape[2])   # [B, Hkv, G, P]
    return out.copy_(torch.where(s.amax(2) > float("-inf"), UNIONS[union](s), float("-inf")))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--union", choices=tuple(UNIONS), required=True)
    known, rest = ap.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    page_scores.score_pages_torch = lambda *a, **kw: group_union_scores(known.union, *a, **kw)
    eval_passkey_cpu.main()
