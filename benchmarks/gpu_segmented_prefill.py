"""One H200 device call per part: layer-segmented prefill in real vLLM 0.26 (Llama-3.1-8B shape, dummy weights).

`--part prefill`: one `--long-len` prompt (default 128K) and one `--mid-len` prompt (32K), each alone, timed from
`generate` to its first token, in four engines (sparseserve everywhere, budget 2048):
  plain     KV in HBM, the whole prompt in one step (`max_num_batched_tokens` = the prompt), the reference;
  chunked   KV in HBM, vLLM's chunked prefill (`--chunk` tokens a step): offload off;
  segmented offload on, layer-segmented prefill (`max_inject_tokens` = chunk x layers, the paper's setting);
  offload-chunked offload on, `layer_segmented_prefill: false` (chunks that gather their context from host DRAM).
`--systems` picks some of them; `--repeats` times each prompt that often (the median is reported, and every run).
Reports each time, the ratios against `plain` and `chunked`, and `segment_peak_bytes` against the bound (hidden
states and residual of the prompt + one layer's KV of it).
`--part load`: TTFT of `--late` prompts of `--late-len` tokens that arrive while `--decodes` requests of
`--decode-len` tokens decode `--decode-out` tokens, with offload and a small HBM cache (the decodes' working sets
fill it, so batch control parks decodes and admits no chunked prefill): segmented vs offload-chunked.
`--part profile`: where the time of one `--mid-len` prompt goes, `plain` vs `segmented` (the engines of `--part
prefill`): the prompt once to warm up, then once under vLLM's torch profiler (`profiler_config`, `LLM.start_profile`
/ `stop_profile`); the worker's Chrome trace is summarized by `summarize_trace` (device-kernel time by category,
the top kernels, each engine step's kernel time, CPU time of the plugin's Python functions). Reports both
summaries and the ratios segmented / plain of the attention kernels (issue #6: <= 1.05) and of all kernel time.
The raw traces are written next to `--out` (`<out>_traces/<system>/`) only with `--keep-traces`.
`--model-path` runs any model folder instead of `configs/<--model>` (a CPU dry run with a tiny model:
`sparseserve_vllm.models.tiny_model_dir`); the offload tier's sizes are `--host-kv-gib` / `--hbm-cache-gib`
(defaults 48 / 8 GiB for a configs/ model, 0.05 / 0.01 GiB with `--model-path`).

    python benchmarks/gpu_segmented_prefill.py --part prefill --out seg_prefill.json
    python benchmarks/gpu_segmented_prefill.py --part profile --out seg_profile.json [--keep-traces]
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from torch_trace import load_trace_events, summarize_trace  # noqa: E402

LAYERS, HIDDEN, KV_HEADS, HEAD_DIM = 32, 4096, 8, 128  # Llama-3.1-8B (the bound of `--part prefill` only)


def make_llm(model, sparseserve, max_model_len, chunk, max_num_seqs=8, gpu_memory_utilization=0.85, **kw):
    from vllm import LLM

    return LLM(model=model, load_format="dummy", attention_backend="sparseserve", max_model_len=max_model_len,
               gpu_memory_utilization=gpu_memory_utilization, skip_tokenizer_init=True, enable_prefix_caching=False,
               seed=0, max_num_seqs=max_num_seqs, max_num_batched_tokens=chunk, optimization_level=0,
               compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"},
               additional_config={"sparseserve": dict(sparseserve, token_budget=2048, stats_interval_s=0)}, **kw)


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


def prefill_systems(args):
    """The engines of `--part prefill` (and `profile`): `(name, sparseserve config, max_num_batched_tokens)`."""
    offload = {"offload": True, "host_kv_gib": args.host_kv_gib, "hbm_cache_gib": args.hbm_cache_gib}
    return [("plain", {}, args.long_len + 16), ("chunked", {}, args.chunk), ("segmented", offload, args.chunk),
            ("offload-chunked", dict(offload, layer_segmented_prefill=False), args.chunk)]


def run_systems(model, systems, max_model_len, body, res, out, engine_kw=lambda name: {}):
    """Each system `(name, sparseserve, chunk)` in its own engine, one at a time: `res["runs"][name]` =
    `{"startup_s": ..., **body(llm, name)}`, or `{"error": ...}` when making the engine or `body` raised (the other
    systems still run); the engine is shut down either way. `engine_kw(name)`: more `LLM` arguments. `res` is
    printed per system and written to `out` after each."""
    res.setdefault("runs", {})
    for name, ss, chunk in systems:
        llm = None
        try:
            t0 = time.perf_counter()
            llm = make_llm(model, ss, max_model_len, chunk, **engine_kw(name))
            run = {"startup_s": round(time.perf_counter() - t0, 1)}
            run.update(body(llm, name))
        except Exception as e:  # keep the other systems' numbers
            run = {"error": f"{type(e).__name__}: {e}"[:1500]}
        if llm is not None:
            try:
                close(llm)
            except Exception as e:
                run.setdefault("close_error", f"{type(e).__name__}: {e}"[:500])
            llm = None  # the last reference: the engine is collected before the next one starts
            gc.collect()
        res["runs"][name] = run
        print(json.dumps({name: run}), flush=True)
        json.dump(res, open(out, "w"), indent=1)


def part_prefill(args, model, out):
    from sparseserve_vllm.stats import read_totals

    rng = random.Random(0)
    long_p = [rng.randrange(3, 500) for _ in range(args.long_len)]
    mid_p = [rng.randrange(3, 500) for _ in range(args.mid_len)]

    def body(llm, name):
        ttft(llm, mid_p[:4096])  # warm-up
        run = {}
        for key, prompt in (("mid_s", mid_p), ("long_s", long_p)):
            times = [ttft(llm, prompt) for _ in range(args.repeats)]
            run[key] = round(statistics.median(times), 3)
            if args.repeats > 1:
                run[key[:-2] + "_all_s"] = [round(x, 3) for x in times]
        time.sleep(1.2)
        run["segment_peak_bytes"] = read_totals()["segment_peak_bytes"]
        return run

    res = {"long_len": args.long_len, "mid_len": args.mid_len, "chunk": args.chunk, "runs": {}}
    systems = [s for s in prefill_systems(args) if s[0] in args.systems.split(",")]
    run_systems(model, systems, args.long_len + 64, body, res, out)
    runs = res["runs"]
    n = args.long_len  # a job holds every prompt token, the last one too (its attention output is kept)
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
    offload = {"offload": True, "host_kv_gib": args.host_kv_gib, "hbm_cache_gib": args.cache_gib}
    res = {k: getattr(args, k) for k in ("decodes", "decode_len", "decode_out", "late", "late_len", "cache_gib",
                                           "chunk", "limit_s")}

    def body(llm, name):
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
        return {"ttft_s": [round(x, 3) for x in ttfts], "mean_ttft_s": round(sum(ttfts) / len(ttfts), 3),
                "late_done": len(first), "censored_at_s": args.limit_s if len(first) < len(late) else None,
                "decodes_started_after_s": round(arrive - t0, 1)}

    systems = [("segmented", offload, args.chunk), ("offload-chunked", dict(offload, layer_segmented_prefill=False),
                                                    args.chunk)]
    run_systems(model, systems, max(args.decode_len, args.late_len) + args.decode_out + 64, body, res, out,
                lambda name: {"max_num_seqs": args.decodes + args.late})
    runs = res["runs"]
    if all("mean_ttft_s" in runs.get(k, {}) for k in ("segmented", "offload-chunked")):
        res["ttft_reduction"] = round(runs["offload-chunked"]["mean_ttft_s"] / runs["segmented"]["mean_ttft_s"], 2)
    json.dump(res, open(out, "w"), indent=1)
    print(json.dumps(res, indent=1))


def part_profile(args, model, out):
    rng = random.Random(0)
    mid_p = [rng.randrange(3, 500) for _ in range(args.mid_len)]
    tmp = tempfile.mkdtemp(prefix="seg_profile_")
    root = os.path.splitext(out)[0] + "_traces" if args.keep_traces else tmp

    def trace_dir(name):
        return os.path.join(root, name)

    def engine_kw(name):
        d = trace_dir(name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        # vLLM 0.26: ProfilerConfig fields; the GPU worker makes its TorchProfilerWrapper (CPU + CUDA activities)
        # at the first start_profile, the CPU worker at start-up (CPU only).
        return {"profiler_config": {"profiler": "torch", "torch_profiler_dir": d,
                                    "torch_profiler_with_stack": not args.no_stack, "torch_profiler_use_gzip": True,
                                    "torch_profiler_dump_cuda_time_total": False}}

    def body(llm, name):
        run = {"warmup_ttft_s": round(ttft(llm, mid_p), 3)}
        llm.start_profile(profile_prefix=name)
        try:
            run["profiled_ttft_s"] = round(ttft(llm, mid_p), 3)
        finally:
            llm.stop_profile()  # the worker writes its trace before this returns
        files = sorted(glob.glob(os.path.join(trace_dir(name), "*.pt.trace.json*")))
        if not files:
            raise RuntimeError(f"no torch trace in {trace_dir(name)}: {os.listdir(trace_dir(name))}")
        run["trace_mb"] = round(sum(os.path.getsize(f) for f in files) / 2**20, 1)
        run["trace_files"] = [os.path.relpath(f, os.path.dirname(os.path.abspath(out))) for f in files] \
            if args.keep_traces else len(files)
        t = time.perf_counter()
        run.update(summarize_trace(load_trace_events(files), top=args.top))
        run["parse_s"] = round(time.perf_counter() - t, 1)
        if not args.keep_traces:
            shutil.rmtree(trace_dir(name), ignore_errors=True)
        return run

    systems = [s for s in prefill_systems(args) if s[0] in ("plain", "segmented")]
    res = {"mid_len": args.mid_len, "chunk": args.chunk, "model": model, "with_stack": not args.no_stack, "runs": {}}
    try:
        run_systems(model, systems, args.long_len + 64, body, res, out, engine_kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    p, s = res["runs"].get("plain", {}), res["runs"].get("segmented", {})
    if "categories" in p and "categories" in s:
        def cat_ms(r, c):
            return r["categories"].get(c, {}).get("ms", 0.0)

        if cat_ms(p, "attention"):
            res["segmented_vs_plain_attention"] = round(cat_ms(s, "attention") / cat_ms(p, "attention"), 3)
        for key in ("kernel_ms", "busy_ms"):
            if p[key]:
                res[f"segmented_vs_plain_{key.removesuffix('_ms')}"] = round(s[key] / p[key], 3)
        res["segmented_vs_plain_profiled_ttft"] = round(s["profiled_ttft_s"] / p["profiled_ttft_s"], 3)
        res["segmented_minus_plain_ms"] = {c: round(cat_ms(s, c) - cat_ms(p, c), 3)
                                           for c in sorted(set(s["categories"]) | set(p["categories"]),
                                                           key=lambda c: -abs(cat_ms(s, c) - cat_ms(p, c)))}
    json.dump(res, open(out, "w"), indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("prefill", "load", "profile"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--model-path", help="a model folder to run instead of configs/<--model> (a tiny one on the CPU)")
    ap.add_argument("--host-kv-gib", type=float, help="offload: host DRAM KV store (default 48, 0.05 with --model-path)")
    ap.add_argument("--hbm-cache-gib", type=float,
                    help="prefill/profile: HBM page cache with offload (default 8, 0.01 with --model-path)")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--systems", default="plain,chunked,segmented,offload-chunked",
                    help="prefill part: the engines to run, comma-separated")
    ap.add_argument("--repeats", type=int, default=1, help="prefill part: TTFT runs of each prompt (the median)")
    ap.add_argument("--long-len", type=int, default=131072)
    ap.add_argument("--mid-len", type=int, default=32768)
    ap.add_argument("--decodes", type=int, default=12)
    ap.add_argument("--decode-len", type=int, default=8192)
    ap.add_argument("--decode-out", type=int, default=64)
    ap.add_argument("--late", type=int, default=3)
    ap.add_argument("--late-len", type=int, default=32768)
    ap.add_argument("--cache-gib", type=float, default=1.0, help="load part: HBM page cache")
    ap.add_argument("--limit-s", type=int, default=120, help="load part: longest wait for each phase")
    ap.add_argument("--keep-traces", action="store_true", help="profile part: keep the raw traces in <out>_traces/")
    ap.add_argument("--no-stack", action="store_true",
                    help="profile part: no Python stacks in the trace (less overhead, no plugin_python)")
    ap.add_argument("--top", type=int, default=15, help="profile part: length of the top lists")
    args = ap.parse_args()
    unknown = set(args.systems.split(",")) - {s[0] for s in prefill_systems(args)}
    if unknown or args.repeats < 1:
        ap.error(f"--systems takes names among plain,chunked,segmented,offload-chunked (got {sorted(unknown)}); "
                 f"--repeats must be >= 1 (got {args.repeats})")
    if args.host_kv_gib is None:
        args.host_kv_gib = 0.05 if args.model_path else 48.0
    if args.hbm_cache_gib is None:
        args.hbm_cache_gib = 0.01 if args.model_path else 8.0
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # a 128K prompt plus its output token
    if args.model_path:
        model = args.model_path
    else:
        from gpu_model import model_dir

        model = model_dir(args.model)
    {"prefill": part_prefill, "load": part_load, "profile": part_profile}[args.part](args, model, args.out)


if __name__ == "__main__":
    main()
