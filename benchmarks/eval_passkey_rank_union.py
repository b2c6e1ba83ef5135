"""Experiment: `eval_passkey_cpu.py` with a rank-based union of a GQA group's per-head page rankings.

Not a product setting. A KV head's one selection is usually made from one score per page that combines its query
heads' scores (`gqa_reduce`: `sum`, `max` of raw scores, `mass`). Here each query head ranks the pages by its own
score and a page's group score is its best rank over the heads (ties: the higher raw score), so the group's top-k is
the round-robin union of the heads' own top lists. It replaces the torch scoring path's `max` for this process only
(`--gqa-reduce max` selects it); the Triton kernels are untouched. Arguments are `eval_passkey_cpu.py`'s.

    python benchmarks/eval_passkey_rank_union.py --placements 40 --selectors quest --budgets 2048 --gqa-reduce max \
        --out benchmarks/results/passkey-smollm2-cpu-quest-40-rank-union.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eval_passkey_cpu  # noqa: E402

from sparseserve_vllm.kernels import page_scores  # noqa: E402

_score_pages_torch = page_scores.score_pages_torch


def rank_union_scores(q, meta, block_table, num_full_pages, *, selector, page_size, ppb, num_kv_heads,
                      gqa_reduce="sum", scale=None, head_scores=None, out=None):
    """`score_pages_torch`, with `gqa_reduce="max"` meaning the rank-based union (module docstring)."""
    if gqa_reduce != "max":
        return _score_pages_torch(q, meta, block_table, num_full_pages, selector=selector, page_size=page_size,
                                  ppb=ppb, num_kv_heads=num_kv_heads, gqa_reduce=gqa_reduce, scale=scale,
                                  head_scores=head_scores, out=out)
    out = page_scores._validate(q, meta, block_table, num_full_pages, selector, page_size, ppb, num_kv_heads, out,
                                gqa_reduce)
    s = page_scores.head_page_scores(q, meta, block_table, num_full_pages, selector=selector, ppb=ppb,
                                     num_kv_heads=num_kv_heads, num_pages=out.shape[2])   # [B, Hkv, G, P]
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1]).expand_as(order))
    score = -rank.min(2).values.float() + 1e-3 * torch.tanh(1e-3 * s.amax(2))      # best rank; ties: raw score
    return out.copy_(torch.where(s.amax(2) > float("-inf"), score, float("-inf")))


if __name__ == "__main__":
    page_scores.score_pages_torch = rank_union_scores
    eval_passkey_cpu.main()
