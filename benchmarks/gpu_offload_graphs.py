"""One GPU device call: SparseServe's offload decode inside vLLM's full CUDA graphs vs eager (Llama-3.1-8B shape,
dummy weights).

Runs the same token-id prompts, greedy, through `sparseserve` with offload on in two engines: eager
(`enforce_eager=True`) and `-O0` with `cudagraph_mode=FULL_DECODE_ONLY` (decode-only batches replay full CUDA
graphs), with `gpu_e2e_smoke.run_engine`. Prints one JSON object: per mode the milliseconds per decode step, the
CUDA-graph mode vLLM settled on and SparseServe's counters (HBM hits, misses, evictions, bytes each way), and whether
the two modes' tokens are equal (`tokens_equal`, `tokens_same`: how many agree).

    python benchmarks/gpu_offload_graphs.py --out results.json [--prompts 16 --input-len 8192 --output-len 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=8192)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--token-budget", type=int, default=2048)
    ap.add_argument("--host-kv-gib", type=float, default=48)
    ap.add_argument("--hbm-cache-gib", type=float, default=8)
    args = ap.parse_args()

    from gpu_e2e_smoke import run_engine
    from gpu_model import model_dir

    model = model_dir(args.model)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(args.input_len)] for _ in range(args.prompts)]
    max_len = args.input_len + args.output_len + 128
    sparseserve = {"token_budget": args.token_budget, "stats_interval_s": 0, "offload": True,
                   "host_kv_gib": args.host_kv_gib, "hbm_cache_gib": args.hbm_cache_gib}
    result = {"model": args.model, "prompts": args.prompts, "input_len": args.input_len,
              "output_len": args.output_len, "sparseserve": sparseserve, "runs": {}}
    for mode, eager in (("eager", True), ("full_decode_graphs", False)):
        try:
            run = run_engine(model, "sparseserve", sparseserve, prompts, args.output_len, max_len, [], eager)
        except Exception as e:  # keep the other mode's numbers
            run = {"error": f"{type(e).__name__}: {e}"[:2000]}
        result["runs"][mode] = run
        print(json.dumps({mode: {k: v for k, v in run.items() if k != "tokens"}}), flush=True)
    eager_tokens = result["runs"]["eager"].get("tokens")
    graph_tokens = result["runs"]["full_decode_graphs"].get("tokens")
    if eager_tokens and graph_tokens:
        result["tokens_equal"] = eager_tokens == graph_tokens
        same = sum(a == b for x, y in zip(eager_tokens, graph_tokens) for a, b in zip(x, y))
        result["tokens_same"] = f"{same}/{sum(len(x) for x in eager_tokens)}"
    for run in result["runs"].values():
        run.pop("tokens", None)
        run.pop("long_prefill_s", None)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
