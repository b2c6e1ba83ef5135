"""One H200 device call per part: layer-segmented prefill in real vLLM 0.26 (Llama-3.1-8B shape, dummy weights).

`--part prefill`: one `--long-len` prompt (default 128K) and one `--mid-len` prompt (32K), each alone, timed from
`generate` to its first token, in four engines (sparseserve everywhere, budget 2048):
  plain     KV in HBM, the whole prompt in one step (`max_num_batched_tokens` = the prompt), the reference;
  chunked   KV in HBM, vLLM's chunked prefill (`--chunk` tokens a step): offload off;
  segmented offload on, layer-segmented prefill (`max_inject_tokens` = chunk x layers, the paper's setting);
  offload-chunked offload on, `layer_segmented_prefill: false` (chunks that gather their context from host DRAM).
Reports each time, the ratios against `plain` and `chunked`, and `segment_peak_bytes` against the bound (hidden
states and residual of the prompt + one layer's KV of it).
`--part load`: TTFT of `--late` prompts of `--late-len` tokens that arrive while `--decodes` requests of
`--decode-len` tokens decode `--decode-out` tokens, with offload and a small HBM cache (the decodes' working sets
fill it, so batch control parks decodes and admits no chunked prefill): segmented vs offload-chunked.

    python benchmarks/gpu_segmented_prefill.py --part prefill --out seg_prefill.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

LAYERS, HIDDEN, KV_HEADS, HEAD_DIM = 32, 4096, 8, 128  # Llama-3.1-8B


def make_llm(model, sparseserve, max_model_len, chunk, max_num_seqs=8):
    from vllm import LLM

    return LLM(model=model, load_format="dummy", attention_backend="sparseserve", max_model_len=max_model_len,
               gpu_memory_utilization=0.85, skip_tokenizer_init=True, enable_prefix_caching=False, seed=0,
               max_num_seqs=max_num_seqs, max_num_batched_tokens=chunk, optimization_level=0,
               compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"},
               additional_config={"sparseserve": dict(sparseserve, token_budget=2048, stats_interval_s=0)})


def close(llm):
    import torch

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def ttft(llm, prompt):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                                                         detokenize=False), use_tqdm=False)
    return time.perf_counter() - t


def part_prefill(args, model, out):
    from sparseserve_vllm.stats import read_totals

    rng = random.Random(0)
    long_p = [rng.randrange(3, 500) for _ in range(args.long_len)]
    mid_p = [rng.randrange(3, 500) for _ in range(args.mid_len)]
    offload = {"offload": True, "host_kv_gib": 48, "hbm_cache_gib": 8}
    systems = [("plain", {}, args.long_len + 16), ("chunked", {}, args.chunk), ("segmented", offload, args.chunk),
               ("offload-chunked", dict(offload, layer_segmented_prefill=False), args.chunk)]
    res = {"long_len": args.long_len, "mid_len": args.mid_len, "chunk": args.chunk, "runs": {}}
    for name, ss, chunk in systems:
        try:
            t0 = time.perf_counter()
            llm = make_llm(model, ss, args.long_len + 64, chunk)
            run = {"startup_s": round(time.perf_counter() - t0, 1)}
            ttft(llm, mid_p[:4096])  # warm-up
            run["mid_s"] = round(ttft(llm, mid_p), 3)
            run["long_s"] = round(ttft(llm, long_p), 3)
            time.sleep(1.2)
            run["segment_peak_bytes"] = read_totals()["segment_peak_bytes"]
            close(llm)
        except Exception as e:  # keep the other systems' numbers
            run = {"error": f"{type(e).__name__}: {e}"[:1500]}
        res["runs"][name] = run
        print(json.dumps({name: run}), flush=True)
        json.dump(res, open(out, "w"), indent=1)
    runs = res["runs"]
    n = args.long_len - 1
    res["segment_bound_bytes"] = 2 * n * HIDDEN * 2 + n * KV_HEADS * 2 * HEAD_DIM * 2
    for key in ("mid_s", "long_s"):
        for ref in ("plain", "chunked"):
            if key in runs.get("segmented", {}) and key in runs.get(ref, {}):
                res[f"segmented_vs_{ref}_{key}"] = round(runs["segmented"][key] / runs[ref][key], 3)
    json.dump(res, open(out, "w"), indent=1)
    print(json.dumps(res, indent=1))


def part_load(args, model, out):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(1)
    decodes = [[rng.randrange(3, 500) for _ in range(args.decode_len)] for _ in range(args.decodes)]
    late = [[rng.randrange(3, 500) for _ in range(args.late_len)] for _ in range(args.late)]
    offload = {"offload": True, "host_kv_gib": 48, "hbm_cache_gib": args.cache_gib}
    res = {k: getattr(args, k) for k in ("decodes", "decode_len", "decode_out", "late", "late_len", "cache_gib",
                                           "chunk", "limit_s")}
    res["runs"] = {}
    for name, ss in [("segmented", offload), ("offload-chunked", dict(offload, layer_segmented_prefill=False))]:
        try:
            llm = make_llm(model, ss, max(args.decode_len, args.late_len) + args.decode_out + 64, args.chunk,
                           max_num_seqs=args.decodes + args.late)
            eng = llm.llm_engine
            sp = SamplingParams(temperature=0, max_tokens=args.decode_out, ignore_eos=True, detokenize=False)
            for i, p in enumerate(decodes):
                eng.add_request(f"d{i}", TokensPrompt(prompt_token_ids=p), sp)
            decoding = set()
            t0 = time.perf_counter()
            while len(decoding) < len(decodes) and time.perf_counter() - t0 < args.limit_s:  # every decode request started
                decoding |= {o.request_id for o in eng.step() if o.outputs and o.outputs[0].token_ids}
            arrive = time.perf_counter()
            for i, p in enumerate(late):
                eng.add_request(f"late{i}", TokensPrompt(prompt_token_ids=p),
                                SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False))
            first = {}
            while len(first) < len(late) and time.perf_counter() - arrive < args.limit_s:
                for o in eng.step():
                    if o.request_id.startswith("late") and o.outputs[0].token_ids and o.request_id not in first:
                        first[o.request_id] = time.perf_counter() - arrive
            # A late prompt without its first token by the limit counts the limit (a lower bound of its TTFT).
            ttfts = sorted(first.values()) + [float(args.limit_s)] * (len(late) - len(first))
            res["runs"][name] = {"ttft_s": [round(x, 3) for x in ttfts], "mean_ttft_s": round(sum(ttfts) / len(ttfts), 3),
                                 "late_done": len(first), "censored_at_s": args.limit_s if len(first) < len(late) else None,
                                 "decodes_started_after_s": round(arrive - t0, 1)}
            close(llm)
        except Exception as e:
            res["runs"][name] = {"error": f"{type(e).__name__}: {e}"[:1500]}
        print(json.dumps({name: res["runs"][name]}), flush=True)
        json.dump(res, open(out, "w"), indent=1)
    runs = res["runs"]
    if all("mean_ttft_s" in runs.get(k, {}) for k in ("segmented", "offload-chunked")):
        res["ttft_reduction"] = round(runs["offload-chunked"]["mean_ttft_s"] / runs["segmented"]["mean_ttft_s"], 2)
    json.dump(res, open(out, "w"), indent=1)
    print(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("prefill", "load"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--long-len", type=int, default=131072)
    ap.add_argument("--mid-len", type=int, default=32768)
    ap.add_argument("--decodes", type=int, default=12)
    ap.add_argument("--decode-len", type=int, default=8192)
    ap.add_argument("--decode-out", type=int, default=64)
    ap.add_argument("--late", type=int, default=3)
    ap.add_argument("--late-len", type=int, default=32768)
    ap.add_argument("--cache-gib", type=float, default=1.0)
    ap.add_argument("--limit-s", type=int, default=120, help="load part: longest wait for each phase")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # a 128K prompt plus its output token
    from gpu_model import model_dir

    model = model_dir(args.model)
    (part_prefill if args.part == "prefill" else part_load)(args, model, args.out)


if __name__ == "__main__":
    main()
