"""Per-selector attention-output error of SparseServe's sparse decode versus dense attention, on SmolLM2.

Runs the built-in SmolLM2-135M-Instruct (transformers, CPU) over pass-key prompts of about 7K tokens (`--filler`); in
every layer, the last token's query attends (a) densely to the whole context and (b) through SparseServe's sparse
decode path (`SparseDecodeWrapper`, torch backend: page metadata, GQA-aware top-k within the budget, attention
over the chosen pages), for each selector (at its default page size and windows), budget and GQA reduction (every
`gqa_reduce`). Reports the relative L2 error ||o_sparse - o_dense|| / ||o_dense|| (mean and max over layers and
prompts) as JSON.

    python benchmarks/eval_attention_error.py --out benchmarks/results/attention-error-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparseserve_vllm.prompts import passkey_document  # noqa: E402
from sparseserve_vllm.kernels import SparseDecodeWrapper, build_page_metadata, num_meta_vectors  # noqa: E402
from sparseserve_vllm.config import DEFAULT_GQA_REDUCE, GQA_REDUCES, SparseServeConfig  # noqa: E402
from sparseserve_vllm.models import smollm2_dir  # noqa: E402

SELECTORS = ("cuboid_mean", "quest", "mean")
# Each selector's page geometry as the plugin resolves it by default: (page_size, sink_pages, recent_pages).
GEOMETRY = {s: (c.page_size, c.sink_pages, c.recent_pages)
            for s in SELECTORS for c in [SparseServeConfig(selector=s)]}


def paged(key, value, page_size=32, block_size=128):
    """The context `key/value [Hkv, L, D]` in SparseServe's KV layout: (pages view, block table, seq_lens, full page ids, Hkv)."""
    hkv, length, d = key.shape
    nb = -(-length // block_size)
    kv = torch.zeros((nb, hkv, block_size, 2 * d), dtype=torch.float32)
    flat = kv.permute(1, 0, 2, 3).reshape(hkv, nb * block_size, 2 * d)
    flat[:, :length, :d] = key
    flat[:, :length, d:] = value
    kv = flat.view(hkv, nb, block_size, 2 * d).permute(1, 0, 2, 3).contiguous()
    ppb = block_size // page_size
    pages = kv.view(-1, page_size, 2 * d)
    block_table = torch.arange(nb, dtype=torch.int32).unsqueeze(0)
    seq_lens = torch.tensor([length], dtype=torch.int32)
    full = torch.tensor([(b * hkv + h) * ppb + j for b in range(nb) for h in range(hkv) for j in range(ppb)
                         if b * block_size + (j + 1) * page_size <= length], dtype=torch.long)
    return pages, block_table, seq_lens, full, hkv


def sparse_attention(q_last, layout, selector, budget, scale, page_size=32, block_size=128, sink_pages=2,
                     recent_pages=2, gqa_reduce=None):
    """SparseServe's decode attention (torch backend) of `q_last [Hq, D]` over a `paged()` context: [Hq, D]."""
    pages, block_table, seq_lens, full, hkv = layout
    d = q_last.shape[-1]
    meta = torch.zeros((pages.shape[0], num_meta_vectors(selector), d), dtype=torch.float32)
    build_page_metadata(pages, meta, full, selector=selector)
    ppb = block_size // page_size
    w = SparseDecodeWrapper(q_last.shape[0], hkv, d, page_size, ppb,
                            selector=selector, token_budget=budget, sink_pages=sink_pages, recent_pages=recent_pages,
                            device="cpu", dtype=torch.float32, backend="torch",
                            gqa_reduce=gqa_reduce or DEFAULT_GQA_REDUCE[selector])
    w.plan(1, block_table.shape[1] * ppb)
    return w.run(q_last[None].float(), pages, meta, block_table, seq_lens, scale)[0]


def sparse_vs_dense(q_last, key, value, scale, budgets):
    """q_last [Hq, D]; key/value [Hkv, L, D]. Returns {(selector, budget, gqa_reduce): relative L2 error}, each
    selector at its default page geometry."""
    layouts = {page: paged(key, value, page_size=page) for page, _, _ in GEOMETRY.values()}
    dense = F.scaled_dot_product_attention(q_last[None, :, None].float(), key[None].float(), value[None].float(),
                                           scale=scale, enable_gqa=True)[0, :, 0]
    return {
        (selector, budget, reduce): float(
            (sparse_attention(q_last, layouts[GEOMETRY[selector][0]], selector, budget, scale,
                              page_size=GEOMETRY[selector][0], sink_pages=GEOMETRY[selector][1],
                              recent_pages=GEOMETRY[selector][2], gqa_reduce=reduce) - dense).norm()
            / dense.norm())
        for selector in SELECTORS for budget in budgets for reduce in GQA_REDUCES
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--filler", type=int, default=300, help="filler sentences (300 -> about 7K tokens)")
    ap.add_argument("--budgets", default="1024,2048")
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    records: dict[tuple[str, int, str], list[float]] = {}

    def probe(module, query, key, value, attention_mask, scaling=None, **kw):
        errs = sparse_vs_dense(query[0, :, -1], key[0], value[0], scaling, budgets)
        for k, v in errs.items():
            records.setdefault(k, []).append(v)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

    AttentionInterface.register("sparseserve_probe", probe)
    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparseserve_probe").eval()
    lengths = []
    t0 = time.time()
    for i in range(args.prompts):
        doc = passkey_document(args.filler, key=str(10000 + 7919 * i))
        ids = tok(doc + "\nWhat is the pass key? The pass key is", return_tensors="pt").input_ids
        lengths.append(ids.shape[1])
        with torch.no_grad():
            model(ids)
    result = {
        "model": "SmolLM2-135M-Instruct (float32, transformers, CPU)", "prompt_tokens": lengths,
        "page_size": {s: g[0] for s, g in GEOMETRY.items()},
        "sink_recent_pages": {s: g[1:] for s, g in GEOMETRY.items()}, "layers": model.config.num_hidden_layers,
        "seconds": round(time.time() - t0, 1),
        "relative_l2_error": {
            f"{sel}@{b}/{reduce}": {"mean": statistics.fmean(v), "max": max(v), "n": len(v),
                                    "default_gqa_reduce": reduce == DEFAULT_GQA_REDUCE[sel]}
            for (sel, b, reduce), v in sorted(records.items())
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
