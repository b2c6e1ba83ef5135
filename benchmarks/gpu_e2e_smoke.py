"""One H200 device call: SparseServe inside real vLLM 0.26 on a GPU (Llama-3.1-8B shape, dummy weights).

Runs the same token-id workload through vLLM's FLASH_ATTN backend and through `sparseserve` (budget covering the
context, budget 2048, then offload on), each in its own engine, and prints one JSON object: per engine the wall
time of a prefill-only pass and of prefill + decode, the decode time per step, the time of `--long-prompts`
prefills of `--long-len` tokens (the offload-on vs offload-off prefill cost), the CUDA-graph mode vLLM settled on,
and SparseServe's counters. It also reports how many greedy tokens agree with dense (random weights: agreement is
informative only when the budget covers the context, which the first sparse run does).
`--graphs` (default): no torch.compile (`-O0`) and full CUDA graphs for decode batches (FULL_DECODE_ONLY) in every
engine; `--eager`: enforce_eager.

    python benchmarks/gpu_e2e_smoke.py --out results.json [--prompts 16 --input-len 16384 --output-len 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def run_engine(model, backend, sparseserve, prompts, output_len, max_model_len, long_prompts, eager):
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from sparseserve_vllm.stats import GAUGE_NAMES, read_totals

    kw = dict(additional_config={"sparseserve": sparseserve}) if sparseserve is not None else {}
    t0 = time.perf_counter()
    if eager:
        kw["enforce_eager"] = True
    else:
        kw.update(optimization_level=0, compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"})
    llm = LLM(model=model, load_format="dummy", attention_backend=backend, max_model_len=max_model_len,
              gpu_memory_utilization=0.85, skip_tokenizer_init=True, enable_prefix_caching=False, seed=0,
              max_num_seqs=max(len(prompts), 8), **kw)
    graph_mode = str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)
    start_s = time.perf_counter() - t0
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    sp1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    spn = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    llm.generate(inputs[:2], sp1, use_tqdm=False)  # warm-up
    before = read_totals()
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(inputs, sp1, use_tqdm=False)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    outs = llm.generate(inputs, spn, use_tqdm=False)
    full_s = time.perf_counter() - t
    t = time.perf_counter()
    if long_prompts:
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in long_prompts], sp1, use_tqdm=False)
    long_s = time.perf_counter() - t
    time.sleep(1.5)
    after = read_totals()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "backend": backend, "sparseserve": sparseserve, "startup_s": round(start_s, 1), "cudagraph_mode": graph_mode,
        "long_prefill_s": round(long_s, 3),
        "prefill_only_s": round(prefill_s, 3), "prefill_plus_decode_s": round(full_s, 3),
        "decode_ms_per_step": round(1000 * (full_s - prefill_s) / max(output_len - 1, 1), 3),
        "counters": {k: after[k] - (0 if k in GAUGE_NAMES else before[k]) for k in after}, "tokens": tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=16384)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--long-prompts", type=int, default=2)
    ap.add_argument("--long-len", type=int, default=32768)
    ap.add_argument("--eager", action="store_true")
    args = ap.parse_args()
    import random

    from gpu_model import model_dir

    model = model_dir(args.model)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(args.input_len)] for _ in range(args.prompts)]
    long_prompts = [[rng.randrange(3, 500) for _ in range(args.long_len)] for _ in range(args.long_prompts)]
    max_len = max(args.input_len + args.output_len, args.long_len + 1) + 128
    runs = []
    plan = [
        ("FLASH_ATTN", None),
        ("sparseserve", {"token_budget": max_len, "stats_interval_s": 0}),
        ("sparseserve", {"token_budget": 2048, "stats_interval_s": 0}),
        ("sparseserve", {"token_budget": 2048, "stats_interval_s": 0, "offload": True, "host_kv_gib": 48,
                         "hbm_cache_gib": 8}),
    ]
    result = {"model": args.model, "prompts": args.prompts, "input_len": args.input_len,
              "output_len": args.output_len, "long_prompts": args.long_prompts, "long_len": args.long_len,
              "eager": args.eager, "runs": runs}
    for backend, ss in plan:
        try:
            runs.append(run_engine(model, backend, ss, prompts, args.output_len, max_len, long_prompts, args.eager))
        except Exception as e:  # keep the other runs' numbers
            runs.append({"backend": backend, "sparseserve": ss, "error": f"{type(e).__name__}: {e}"[:2000]})
        with open(args.out, "w") as f:
            json.dump(result, f)
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "tokens"}), flush=True)
    dense = runs[0].get("tokens")
    for r in runs[1:]:
        if dense and r.get("tokens"):
            same = sum(a == b for x, y in zip(dense, r["tokens"]) for a, b in zip(x, y))
            r["tokens_equal_to_dense"] = f"{same}/{sum(len(x) for x in dense)}"
    for r in runs:
        r.pop("tokens", None)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
