"""One device call: working-set-aware batch control on vs off, and offload capacity, inside real vLLM 0.26.

Both engines: SparseServe with offload, dummy weights of a real config (configs/), the same requests (token ids
from a seed), `-O0` with full decode CUDA graphs requested (offload runs attention eagerly, so vLLM settles on no
graphs), an HBM page cache (`--cache-gib`) far smaller than the requests' KV (`--host-gib` of pinned DRAM).
`batch_control` true (the default) admits decode requests while their working sets fit the cache; false is vLLM's
own admission, which lets all of them decode together and thrash the cache. Per engine it prints and writes:
the wall time of the decode phase (all prompts prefilled first with max_tokens=1, then `--output` tokens each),
output tokens/s over that phase, pages loaded (cache misses) per decode step, the largest batch cap seen and the
KV of that many requests as a multiple of the HBM cache (capacity), and the greedy tokens' agreement between the
two engines.

    python benchmarks/gpu_batch_control.py --out r.json [--requests 16 --context 32768 --output 64]

Where one call cannot hold both engines, run `--only on` and `--only off` in two calls (each JSON then keeps its
greedy tokens) and join them: `python benchmarks/gpu_batch_control.py --out r.json --combine on.json off.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))


def run(model, control: bool, prompts, a) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from sparseserve_vllm.stats import GAUGE_NAMES, read_totals

    ss = {"offload": True, "host_kv_gib": a.host_gib, "hbm_cache_gib": a.cache_gib, "batch_control": control,
          "stats_interval_s": 0}
    t0 = time.perf_counter()
    llm = LLM(model=model, load_format="dummy", attention_backend="sparseserve", max_model_len=a.context + a.output + 256,
              gpu_memory_utilization=0.85, skip_tokenizer_init=True, seed=0, max_num_seqs=max(len(prompts), 8),
              optimization_level=0, compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"},
              additional_config={"sparseserve": ss})
    start_s = time.perf_counter() - t0
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    sp1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    spn = SamplingParams(temperature=0, max_tokens=a.output, ignore_eos=True, detokenize=False)
    t = time.perf_counter()
    llm.generate(inputs, sp1, use_tqdm=False)
    prefill_s = time.perf_counter() - t
    caps, done = [], threading.Event()

    def watch():
        while not done.is_set():
            caps.append(read_totals()["batch_cap"])
            time.sleep(0.05)

    before = read_totals()
    w = threading.Thread(target=watch)
    w.start()
    t = time.perf_counter()
    outs = llm.generate(inputs, spn, use_tqdm=False)
    total_s = time.perf_counter() - t
    done.set()
    w.join()
    time.sleep(1.5)
    after = read_totals()
    delta = {k: after[k] - (0 if k in GAUGE_NAMES else before[k]) for k in after}  # gauges: the value after
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    layers = 32
    steps = max(delta["decode_steps"] / layers, 1)
    kv_per_request_gib = a.context * layers * 8 * 128 * 2 * 2 / 2**30  # Llama-3.1-8B: 128 KiB per token
    cap = max(caps) if caps else 0
    return {
        "batch_control": control, "startup_s": round(start_s, 1), "prefill_s": round(prefill_s, 2),
        "prefill_plus_decode_s": round(total_s, 2), "output_tokens": len(prompts) * a.output,
        "output_tok_s": round(len(prompts) * a.output / total_s, 1), "decode_steps": round(steps),
        "pages_loaded_per_step": round(delta["bytes_h2d"] / 16384 / steps, 1),  # 16 KiB pages (32 tokens)
        "gib_loaded_per_step": round(delta["bytes_h2d"] / steps / 2**30, 3),
        "max_batch_cap": cap, "kv_of_cap_requests_vs_cache": round(cap * kv_per_request_gib / a.cache_gib, 2),
        "parked_steps": delta["parked_steps"], "counters": delta,
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--cache-gib", type=float, default=2.0)
    ap.add_argument("--host-gib", type=float, default=72.0)
    ap.add_argument("--only", choices=["on", "off"], default=None)
    ap.add_argument("--combine", nargs=2, metavar=("ON_JSON", "OFF_JSON"),
                    help="join two --only runs (same arguments) into --out instead of running")
    a = ap.parse_args()
    if a.combine:
        parts = [json.load(open(p)) for p in a.combine]
        res = {k: v for k, v in parts[0].items() if k != "runs"}
        if any({k: v for k, v in p.items() if k != "runs"} != res for p in parts):
            raise SystemExit("--combine: the two runs were made with different arguments")
        res["runs"] = parts[0]["runs"] + parts[1]["runs"]
        if [r["batch_control"] for r in res["runs"]] != [True, False]:
            raise SystemExit("--combine takes the --only on JSON first, then the --only off JSON")
        write(res, a.out)
        return
    import random

    from gpu_model import model_dir

    model = model_dir(a.model)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(a.context)] for _ in range(a.requests)]
    res = {"requests": a.requests, "context": a.context, "output": a.output, "cache_gib": a.cache_gib,
           "host_gib": a.host_gib, "runs": []}
    for control in ([True, False] if a.only is None else [a.only == "on"]):
        try:
            res["runs"].append(run(model, control, prompts, a))
        except Exception as e:
            res["runs"].append({"batch_control": control, "error": f"{type(e).__name__}: {e}"[-2000:]})
        print(json.dumps({k: v for k, v in res["runs"][-1].items() if k not in ("tokens", "counters")}), flush=True)
    write(res, a.out, keep_tokens=a.only is not None)


def write(res: dict, out: str, keep_tokens: bool = False) -> None:
    """Ratios of the on and off runs when both ran (tokens compared where both kept theirs), then the JSON."""
    ok = [r for r in res["runs"] if "output_tok_s" in r]
    if len(ok) == 2:
        on, off = ok
        if "tokens" in on and "tokens" in off:
            same = sum(x == y for p, q in zip(on["tokens"], off["tokens"]) for x, y in zip(p, q))
            res["tokens_equal"] = f"{same}/{sum(len(p) for p in on['tokens'])}"
        else:
            res["tokens_equal"] = "not compared (a run kept no tokens)"
        res["throughput_on_vs_off"] = round(on["output_tok_s"] / off["output_tok_s"], 3)
        res["loads_off_vs_on"] = round(off["pages_loaded_per_step"] / max(on["pages_loaded_per_step"], 1e-9), 2)
    if not keep_tokens:
        for r in res["runs"]:
            r.pop("tokens", None)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))


if __name__ == "__main__":
    main()
