"""One H200 device call: where the time of an offload decode step goes, in real vLLM 0.26 (Llama-3.1-8B shape,
dummy weights).

Two engines, one after the other in this process (each shut down before the next starts; `gpu_segmented_prefill`'s
`make_llm`/`run_systems`), both `sparseserve` (token budget 2048, `stats_interval_s` 0), dummy weights, `-O0` with
full CUDA graphs for decode batches (`cudagraph_mode=FULL_DECODE_ONLY`; the CPU platform captures no graphs), no
prefix caching, no tokenizer, token-id prompts of a seeded RNG, greedy:
  sparse   offload off (all KV in HBM);
  offload  offload on, `--host-kv-gib` of pinned host DRAM and an HBM page cache of `--hbm-cache-gib` (defaults 48 /
           24 GiB for a configs/ model: the cache holds every page the requests select, so once a request's pages
           are in, its decode steps load nothing; `counters_*` show the hits and misses).
In each: `--batch` prompts of `--context` tokens, prefilled in one step each (`max_num_batched_tokens` = context +
16, so no layer-segmented prefill; `--chunk`, `--max-model-len` and `--max-num-seqs` set what `vllm serve` in
`e2e_serve.py` uses instead: 8192, 131072, 64); a warm-up generate of `--warmup` tokens; the unprofiled wall time per decode
step, (time of a generate of `--steps` tokens - time of a generate of 1 token) / (steps - 1), as
gpu_offload_graphs.py measures it, with SparseServe's counters over both generates (`counters_timed`: HBM hits,
misses, bytes each way); then one generate of `--steps` tokens under vLLM's torch profiler (`profiler_config`,
`LLM.start_profile`/`stop_profile`, Python stacks unless `--no-stack`; `counters_profiled`).
What is counted: the trace holds that generate's prefill too; `torch_trace.summarize_decode_steps` counts only
decode steps (engine steps whose `execute_context_*` annotation has no context request), the longest run of them
with all `--batch` requests decoding, less its first `--skip` steps (the first decode step after a prefill loads the
request's selected pages: the prompt's KV bypasses the HBM cache) and less its last one if no step follows it (it
has no interval). A step's interval runs from its `execute_model` to the next one's, so it includes sampling and
the engine's work between steps. Per counted step it reports the profiled step time, the CPU time of
`execute_model`, GPU busy (union of device events) and idle (first to last device event, less busy) time, kernels
and their time by category (`summarize_trace`'s), the top kernels, CUDA-graph replays (`graph_kernels_seen`:
whether their kernels are in the trace at all; `gpu_busy_source` says what busy time is made of), host syncs
(`*Synchronize*` calls and device-to-host memcpys, their host time, and the Python frames that made them:
`sync_sites`), the plugin's Python functions' CPU time, and each counted step's own numbers. The trace is the
worker's process: with one GPU, vLLM's engine core, so the scheduler's Python is in it too.
Top level: `offload_vs_sparse` (ratios offload / sparse of the wall ms per step, GPU busy per step and kernels per
step) and `offload_minus_sparse` (per-step differences). How to read them: extra GPU busy time and kernels per step
are the offload path's device work (many small kernels, FlashD2H, loads); extra GPU idle time with extra host syncs
or `execute_model` CPU time is the host side (syncs that make the engine's CPU time add to the GPU's); `gap_ms` of
`cuda_graphs` is the GPU idle between the kernels of one graph replay. The profiler slows the host (the more with
stacks), so each run also reports `wall_minus_gpu_busy_ms`: the unprofiled wall time per step less the profiled
GPU busy time, the unprofiled step's GPU idle time (its host-side share) as far as profiling leaves kernels as fast.
`--model-path` runs any model folder instead of `configs/<--model>` (a CPU dry run with a tiny model:
`sparseserve_vllm.models.tiny_model_dir`; offload sizes then default to 0.05 / 0.01 GiB, and the engines take a
512 MiB KV pool and `gpu_memory_utilization` 0.3, which on the CPU build is the share of host memory reserved). On
the CPU build the trace holds CPU events only: the device fields are absent and `gpu_busy_source` says so. Raw
traces are kept in `<out>_traces/<system>/` only with `--keep-traces`. The JSON is written to `--out` after each
engine (an engine's failure is recorded as its `error`; the other still runs) and printed.
Time on the H200 (budget ~9 minutes for one 10-minute call): per engine ~30-45 s start-up (-O0, decode graphs;
offload also pins the host store), four 16K prefills and ~70 decode steps (~10 s), the profiled generate, the
trace's write and parse (tens of seconds with stacks): expected 3-5 minutes for both; `timeout 560` keeps the first
engine's results if the second runs long.

    PYTHONPATH=$PWD timeout 560 python benchmarks/gpu_offload_profile.py --out offload_profile.json [--keep-traces]
    python benchmarks/gpu_offload_profile.py --out /tmp/p.json --context 600 --steps 4 \\
        --model-path "$(python -c 'from sparseserve_vllm.models import tiny_model_dir as t; print(t())')"  # CPU
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from gpu_segmented_prefill import run_systems  # noqa: E402
from torch_trace import load_trace_events, summarize_decode_steps  # noqa: E402


def timed_generate(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    t = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    return time.perf_counter() - t


def counters_since(before: dict) -> dict:
    """SparseServe's counters that grew since `before` (the workers publish theirs twice a second)."""
    from sparseserve_vllm.stats import COUNTER_NAMES, read_totals

    time.sleep(1.2)
    after = read_totals()
    return {k: after[k] - before[k] for k in COUNTER_NAMES if after[k] != before[k]}


def profile_systems(args, model, out):
    from sparseserve_vllm.stats import read_totals

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(args.context)] for _ in range(args.batch)]
    tmp = tempfile.mkdtemp(prefix="offload_profile_")
    root = os.path.splitext(out)[0] + "_traces" if args.keep_traces else tmp

    def engine_kw(name):
        d = os.path.join(root, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        # A tiny model (a CPU dry run): a small KV pool, and reserve little memory (on the CPU build
        # gpu_memory_utilization is the share of the host's memory the worker takes).
        small = {"kv_cache_memory_bytes": 512 << 20, "gpu_memory_utilization": 0.3} if args.model_path else {}
        return {**small, "max_num_seqs": args.max_num_seqs or max(args.batch, 8),
                "profiler_config": {"profiler": "torch", "torch_profiler_dir": d,
                                    "torch_profiler_with_stack": not args.no_stack, "torch_profiler_use_gzip": True,
                                    "torch_profiler_dump_cuda_time_total": False}}

    def body(llm, name):
        config = llm.llm_engine.vllm_config
        run = {"cudagraph_mode": str(config.compilation_config.cudagraph_mode),
               "async_scheduling": config.scheduler_config.async_scheduling}
        timed_generate(llm, prompts, args.warmup)
        before = read_totals()
        prefill_s = timed_generate(llm, prompts, 1)
        full_s = timed_generate(llm, prompts, args.steps)
        run["wall_ms_per_step"] = round(1e3 * (full_s - prefill_s) / (args.steps - 1), 3)
        run["counters_timed"] = counters_since(before)
        before = read_totals()
        llm.start_profile(profile_prefix=name)
        try:
            run["profiled_generate_s"] = round(timed_generate(llm, prompts, args.steps), 3)
        finally:
            llm.stop_profile()  # the worker writes its trace before this returns
        run["counters_profiled"] = counters_since(before)
        d = os.path.join(root, name)
        files = sorted(glob.glob(os.path.join(d, "*.pt.trace.json*")))
        if not files:
            run["trace_error"] = f"no torch trace in {d} ({os.listdir(d)}): nothing profiled"
            return run
        run["trace_mb"] = round(sum(os.path.getsize(f) for f in files) / 2**20, 1)
        run["trace_files"] = [os.path.relpath(f, os.path.dirname(os.path.abspath(out))) for f in files] \
            if args.keep_traces else len(files)
        t = time.perf_counter()
        run["trace"] = summarize_decode_steps(load_trace_events(files), skip=args.skip, top=args.top)
        run["parse_s"] = round(time.perf_counter() - t, 1)
        busy = run["trace"].get("per_step", {}).get("gpu_busy_ms")
        if busy is not None:
            run["wall_minus_gpu_busy_ms"] = round(run["wall_ms_per_step"] - busy, 3)
        if not args.keep_traces:
            shutil.rmtree(d, ignore_errors=True)
        return run

    offload = {"offload": True, "host_kv_gib": args.host_kv_gib, "hbm_cache_gib": args.hbm_cache_gib}
    chunk = args.chunk or args.context + 16  # by default one prompt's prefill in one step
    systems = [("sparse", {}, chunk), ("offload", offload, chunk)]  # make_llm adds token_budget, stats_interval_s 0
    max_model_len = args.max_model_len or args.context + max(args.steps, args.warmup) + 64
    res = {k: getattr(args, k) for k in ("batch", "context", "steps", "warmup", "skip", "host_kv_gib", "hbm_cache_gib",
                                         "max_num_seqs")}
    res.update(model=model, with_stack=not args.no_stack, token_budget=2048, max_model_len=max_model_len,
               max_num_batched_tokens=chunk, runs={})
    try:
        run_systems(model, systems, max_model_len, body, res, out, engine_kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    compare(res)
    json.dump(res, open(out, "w"), indent=1)
    print(json.dumps(res, indent=1))


def compare(res):
    """`offload_vs_sparse` (ratios) and `offload_minus_sparse` (differences per step) of both runs' numbers."""
    s, o = res["runs"].get("sparse", {}), res["runs"].get("offload", {})
    if "wall_ms_per_step" not in s or "wall_ms_per_step" not in o:
        return
    ts, to = s.get("trace", {}), o.get("trace", {})
    ps, po = ts.get("per_step", {}), to.get("per_step", {})
    pairs = {k: (s[k], o[k]) for k in ("wall_ms_per_step", "wall_minus_gpu_busy_ms") if k in s and k in o}
    pairs.update({k: (ps[k], po[k]) for k in ("step_ms", "execute_model_cpu_ms", "gpu_busy_ms", "gpu_idle_ms",
                                              "kernels", "kernel_ms", "host_syncs", "host_sync_ms")
                  if k in ps and k in po})
    res["offload_vs_sparse"] = {k: round(b / a, 3) for k, (a, b) in pairs.items()
                                if k in ("wall_ms_per_step", "gpu_busy_ms", "kernels") and a}
    diff = {k: round(b - a, 3) for k, (a, b) in pairs.items()}
    cs, co = ts.get("categories", {}), to.get("categories", {})
    cats = {c: round(co.get(c, {}).get("ms", 0.0) - cs.get(c, {}).get("ms", 0.0), 3) for c in set(cs) | set(co)}
    diff["categories_ms"] = dict(sorted(cats.items(), key=lambda kv: -abs(kv[1])))
    res["offload_minus_sparse"] = diff


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--model-path", help="a model folder to run instead of configs/<--model> (a tiny one on the CPU)")
    ap.add_argument("--batch", type=int, default=1, help="decode requests")
    ap.add_argument("--context", type=int, default=16384, help="prompt tokens of each request")
    ap.add_argument("--steps", type=int, default=32, help="tokens of the timed and of the profiled generate")
    ap.add_argument("--warmup", type=int, default=4, help="tokens of the warm-up generate")
    ap.add_argument("--skip", type=int, default=1, help="decode steps of the profiled generate left uncounted")
    ap.add_argument("--host-kv-gib", type=float, help="offload: host KV store (default 48, 0.05 with --model-path)")
    ap.add_argument("--hbm-cache-gib", type=float, help="offload: HBM page cache (default 24, 0.01 with --model-path)")
    ap.add_argument("--max-model-len", type=int, help="default: --context + the steps + 64 (e2e_serve.py's: 131072)")
    ap.add_argument("--max-num-seqs", type=int, help="default: max(--batch, 8) (e2e_serve.py's: 64)")
    ap.add_argument("--chunk", type=int, help="max_num_batched_tokens; default --context + 16, one prefill step "
                    "(vllm serve's default 8192 prefills a longer prompt layer-segmented)")
    ap.add_argument("--keep-traces", action="store_true", help="keep the raw traces in <out>_traces/")
    ap.add_argument("--no-stack", action="store_true",
                    help="no Python stacks in the trace (less host overhead; no plugin_python, no sync_sites)")
    ap.add_argument("--top", type=int, default=15, help="length of the top lists")
    args = ap.parse_args()
    if args.steps < args.skip + args.batch + 2:  # steps of all --batch requests decoding: steps - batch
        ap.error("--steps must leave decode steps to count: at least --skip + --batch + 2")
    if args.host_kv_gib is None:
        args.host_kv_gib = 0.05 if args.model_path else 48.0
    if args.hbm_cache_gib is None:
        args.hbm_cache_gib = 0.01 if args.model_path else 24.0
    if args.model_path:
        model = args.model_path
    else:
        from gpu_model import model_dir

        model = model_dir(args.model)
    profile_systems(args, model, args.out)


if __name__ == "__main__":
    main()
