"""Pass-key retrieval of SparseServe's sparse decode versus dense, on SmolLM2 with transformers on a CPU.

The CPU counterpart of `eval_passkey.py` (which runs whole vLLM engines and suits a GPU): each prompt is prefilled
once densely; then, for dense and for every selector x budget, a copy of its KV cache is decoded greedily with the
decode attention of every layer replaced by SparseServe's sparse decode path (`SparseDecodeWrapper`, torch backend:
page metadata, GQA-aware top-k within the budget, attention over the chosen pages). The answer counts when it holds
the key. The assistant turn is opened with "The pass key is" so a few tokens decide.

    python benchmarks/eval_passkey_cpu.py --out benchmarks/results/passkey-smollm2-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval_attention_error import SELECTORS, paged, sparse_attention  # noqa: E402

from sparseserve_vllm.config import GQA_REDUCES, SparseServeConfig  # noqa: E402
from sparseserve_vllm.models import smollm2_dir  # noqa: E402
from sparseserve_vllm.prompts import passkey_prompt  # noqa: E402

MODE: dict = {"config": None}  # None: dense decode; a SparseServeConfig: sparse decode with its settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--placements", type=int, default=20)
    ap.add_argument("--filler", type=int, default=300, help="filler sentences (300 -> about 7K tokens)")
    ap.add_argument("--budgets", default="1024,2048")
    ap.add_argument("--new-tokens", type=int, default=7)
    ap.add_argument("--selectors", default=",".join(SELECTORS))
    ap.add_argument("--page-size", type=int, default=None, choices=(8, 16, 32, 64, 128),
                    help="default: each selector's default (`page_size` null in SparseServeConfig)")
    ap.add_argument("--sink-pages", type=int, default=None, help="default: SparseServeConfig's for the page size")
    ap.add_argument("--recent-pages", type=int, default=None, help="default: SparseServeConfig's for the page size")
    ap.add_argument("--dense-layers", type=int, default=0, help="the first N layers decode densely (`dense_layers`)")
    ap.add_argument("--gqa-reduce", choices=GQA_REDUCES, default=None,
                    help="how a KV head's query heads combine their page scores (`gqa_reduce`; default: the "
                         "selector's default, as in SparseServeConfig)")
    args = ap.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, scaling=None, **kw):
        if MODE["config"] is None or query.shape[2] != 1 or module.layer_idx < args.dense_layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
        cfg = MODE["config"]
        layout = paged(key[0], value[0], page_size=cfg.page_size)
        out = sparse_attention(query[0, :, 0], layout, cfg.selector, cfg.token_budget, scaling,
                               page_size=cfg.page_size, sink_pages=cfg.sink_pages, recent_pages=cfg.recent_pages,
                               gqa_reduce=cfg.resolved_gqa_reduce)
        return out[None, None].to(query.dtype), None

    AttentionInterface.register("sparseserve_eval", attention)
    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparseserve_eval").eval()
    selectors = args.selectors.split(",")
    for s in selectors:
        if s not in SELECTORS:
            raise SystemExit(f"--selectors: unknown selector {s!r}; allowed: {', '.join(SELECTORS)}")
    # The settings as the plugin resolves them (`SparseServeConfig`: null page geometry and reduction per selector).
    configs = [None] + [SparseServeConfig(selector=s, token_budget=int(b), page_size=args.page_size,
                                          sink_pages=args.sink_pages, recent_pages=args.recent_pages,
                                          gqa_reduce=args.gqa_reduce)
                        for b in args.budgets.split(",") for s in selectors]
    name = lambda c: "dense" if c is None else f"{c.selector}@{c.token_budget}"  # noqa: E731
    first: dict = {}  # each selector's settings (the same at every budget)
    for c in configs[1:]:
        first.setdefault(c.selector, c)
    hits = {name(c): 0 for c in configs}
    answers = {name(c): [] for c in configs}
    lengths = []
    t0 = time.time()
    for i in range(args.placements):
        prompt, key = passkey_prompt(i, args.filler, (i + 0.5) / args.placements)
        chat = tok.apply_chat_template([{"role": "user", "content": prompt + " Answer with the number only."}],
                                       add_generation_prompt=True, tokenize=False) + "The pass key is"
        ids = tok(chat, return_tensors="pt", add_special_tokens=False).input_ids
        lengths.append(ids.shape[1])
        with torch.no_grad():
            MODE["config"] = None
            pre = model(ids[:, :-1], use_cache=True)
            for c in configs:
                MODE["config"] = c
                cache, last, out = copy.deepcopy(pre.past_key_values), ids[:, -1:], []
                for _ in range(args.new_tokens):
                    step = model(last, past_key_values=cache, use_cache=True)
                    last = step.logits[:, -1:].argmax(-1)
                    out.append(int(last))
                text = tok.decode(out)
                answers[name(c)].append(text)
                hits[name(c)] += key in text.replace(" ", "")
        print(json.dumps({"prompt": i, "tokens": lengths[-1], "key": key,
                          "answers": {k: v[-1] for k, v in answers.items()}}), flush=True)
    result = {
        "model": "SmolLM2-135M-Instruct (float32, transformers, CPU)", "placements": args.placements,
        "prompt_tokens": {"min": min(lengths), "max": max(lengths)},
        "page_size": {s: c.page_size for s, c in first.items()},
        "sink_pages": {s: c.sink_pages for s, c in first.items()},
        "recent_pages": {s: c.recent_pages for s, c in first.items()}, "dense_layers": args.dense_layers,
        "gqa_reduce": {s: c.resolved_gqa_reduce for s, c in first.items()},
        "seconds": round(time.time() - t0, 1),
        "accuracy": {k: v / args.placements for k, v in hits.items()}, "answers": answers,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "answers"}, indent=1))


if __name__ == "__main__":
    main()
