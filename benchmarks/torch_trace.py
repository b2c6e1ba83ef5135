"""Summaries of torch profiler Chrome traces (as vLLM's `profiler_config` writes them), for the GPU benchmarks.

`load_trace_events(files)` reads the trace files (gzipped or not); `summarize_trace(events)` returns device-kernel
time by category (SparseServe's own Triton kernels by name, attention, GEMM, memcpy each way, memset, other), the
top kernels, each engine step's kernel time (vLLM's `execute_context_*` markers) and the CPU time of the plugin's
Python functions (when the trace has Python stacks). Without device events (a CPU run) it counts `cpu_op` self time,
so a dry run on the CPU build gives a non-empty summary.
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
from collections import defaultdict

# Our Triton kernels (sparseserve_vllm/kernels) by function name, as a CUDA trace names their launches.
SPARSESERVE_KERNELS = ("_flash_h2d_kernel", "_flash_d2h_scatter_kernel", "_build_meta_kernel", "_sparse_decode_kernel",
                       "_merge_splits_kernel", "_score_pages_kernel", "_select_pages_kernel")
# Substrings of lower-cased names. FlashAttention 2/3 (vLLM's vllm_flash_attn: `flash::flash_fwd_*`,
# `flash::FlashAttnFwdSm90<...cutlass...>`), cuDNN / xformers fmha, torch SDPA (the CPU path's
# `aten::_scaled_dot_product_*`); attention is matched before GEMMs because FA3's names contain `cutlass`.
ATTENTION_NAMES = ("flash_fwd", "flashattnfwd", "flash::", "fmha", "flash_attn", "scaled_dot_product", "sdpa",
                   "attention")
GEMM_NAMES = ("gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::baddbmm", "onednn", "dnnl", "mkl")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
STEP_PREFIX = "execute_context_"  # vLLM's worker runs each execute_model in record_function("execute_context_...")
IDLE_STEP = "execute_context_0(0)_generation_0(0)"  # schedules no token (layer-segmented units may run in it)
_PY_FUNC = re.compile(r"sparseserve_vllm/(.+?)\(\d+\): (.+)$")


def kernel_category(name: str, cat: str) -> str:
    """The category of one device event (`cat` as in torch's Chrome trace): `sparseserve:<kernel>` for our Triton
    kernels, `memcpy_htod`, `memcpy_dtoh`, `memcpy_other`, `memset`, `attention`, `gemm`, else `other` (also
    vLLM's custom-op wrappers `vllm::*`, whose CPU self time is the Python around the kernels)."""
    for k in SPARSESERVE_KERNELS:
        if k in name:
            return "sparseserve:" + k.strip("_").removesuffix("_kernel")
    if name.startswith("vllm::"):  # a custom op's dispatch (`vllm::unified_attention_with_output`): a CPU op
        return "other"
    low = name.lower()
    if cat == "gpu_memcpy":
        return "memcpy_htod" if "htod" in low else "memcpy_dtoh" if "dtoh" in low else "memcpy_other"
    if cat == "gpu_memset":
        return "memset"
    if any(s in low for s in ATTENTION_NAMES):
        return "attention"
    if any(s in low for s in GEMM_NAMES):
        return "gemm"
    return "other"


def _cpu_op_times(events):
    """`[(event, self time, category)]` of nested `cpu_op` events: each event's duration less that of the events
    nested directly inside it on the same thread (so summing them counts no time twice); its category is that of
    its nearest ancestor with a category other than `other` (the `aten::bmm` and `aten::_softmax` inside
    `aten::scaled_dot_product_attention` are attention), else its own (`kernel_category`)."""
    out = []
    threads = defaultdict(list)
    for e in events:
        threads[(e.get("pid"), e.get("tid"))].append(e)
    for evs in threads.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # (end, index in out) of the open ancestors
        for e in evs:
            ts, end = e["ts"], e["ts"] + e["dur"]
            while stack and stack[-1][0] <= ts:
                stack.pop()
            cat = kernel_category(e.get("name", ""), "cpu_op")
            if stack:
                parent = out[stack[-1][1]]
                parent[1] -= min(end, stack[-1][0]) - ts
                if parent[2] != "other":
                    cat = parent[2]
            out.append([e, float(e["dur"]), cat])
            stack.append((end, len(out) - 1))
    return [(e, max(d, 0.0), c) for e, d, c in out]


def load_trace_events(files) -> list[dict]:
    """The `traceEvents` of torch Chrome-trace files (`.json` or `.json.gz`), concatenated (several ranks: summed)."""
    events = []
    for f in files:
        with (gzip.open(f, "rt") if f.endswith(".gz") else open(f)) as fh:
            events += json.load(fh).get("traceEvents", [])
    return events


def summarize_trace(events, top: int = 15, max_steps: int = 64) -> dict:
    """Where the device time of one profiled window went, from torch's Chrome-trace events (what vLLM's worker wrote
    between `start_profile` and `stop_profile`). Times in ms.
    - Device events: complete events (`ph` "X") of cat `kernel`, `gpu_memcpy`, `gpu_memset` (a CUDA trace), each its
      duration. A trace with none (the CPU build records CPU activity only) uses its `cpu_op` events, each with its
      self time and inherited category (`_cpu_op_times`); `source` says which.
    - `kernel_ms`: their sum (kernels on several streams each count); `busy_ms`: the union of their intervals
      (overlap counts once); `span_ms`: first event start to last event end in the trace.
    - `categories`: `{category: {ms, n, share}}` by `kernel_category`, largest first; `top_kernels`: the `top`
      (name, category) pairs by total time (names cut at 160 characters) with counts.
    - Engine steps: `user_annotation` events named `execute_context_*` (vLLM's worker, one per `execute_model`;
      `execute_context_0(0)_generation_0(0)` schedules no token, and layer-segmented prefill units run in such
      steps, from the connector). `engine_steps`, `steps_with_tokens`, and `steps` (the first `max_steps`): name,
      CPU wall ms, kernel ms and its top 5 categories. A kernel belongs to the step whose interval holds its launch
      (the `cuda_runtime`/`cuda_driver` event of the same `correlation`; its own start when it has none);
      `outside_steps_kernel_ms`: kernels of no step.
    - `plugin_python`: `python_function` events (present when the profiler records stacks) from files under
      `sparseserve_vllm/`, grouped by `file:function`, the `top` by total inclusive CPU ms (a function's time
      includes its callees'), with call counts; empty without stacks."""
    xs = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    dev = [(e, float(e["dur"]), kernel_category(e.get("name", ""), e["cat"]))
           for e in xs if e.get("cat") in DEVICE_CATS]
    source = "cuda kernels"
    if not dev:
        source = "cpu_op self time (no device events)"
        dev = _cpu_op_times([e for e in xs if e.get("cat") == "cpu_op"])
    steps = sorted((e for e in xs if e.get("cat") == "user_annotation" and e.get("name", "").startswith(STEP_PREFIX)),
                   key=lambda e: e["ts"])
    starts = [s["ts"] for s in steps]
    launch = {e["args"]["correlation"]: e["ts"] for e in xs
              if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    cats = defaultdict(lambda: [0.0, 0])
    names = defaultdict(lambda: [0.0, 0])  # (name, category) -> [us, count]
    per_step = [defaultdict(float) for _ in steps]
    outside = 0.0
    for e, d, c in dev:
        cats[c][0] += d
        cats[c][1] += 1
        k = names[(e.get("name", ""), c)]
        k[0] += d
        k[1] += 1
        t = launch.get(e.get("args", {}).get("correlation"), e["ts"])
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and t <= steps[i]["ts"] + steps[i]["dur"]:
            per_step[i][c] += d
        else:
            outside += d
    total = sum(v[0] for v in cats.values())
    busy, end = 0.0, float("-inf")
    for ts, te in sorted((e["ts"], e["ts"] + e["dur"]) for e, _, _ in dev):
        if te > end:
            busy += te - max(ts, end)
            end = te
    py = defaultdict(lambda: [0.0, 0])
    for e in xs:
        if e.get("cat") == "python_function":
            m = _PY_FUNC.search(e.get("name", ""))
            if m:
                v = py[f"{m.group(1)}:{m.group(2)}"]
                v[0] += e["dur"]
                v[1] += 1
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    return {
        "source": source,
        "kernel_ms": ms(total),
        "busy_ms": ms(busy),
        "span_ms": ms(max(e["ts"] + e["dur"] for e in xs) - min(e["ts"] for e in xs)) if xs else 0.0,
        "categories": {c: {"ms": ms(v[0]), "n": v[1], "share": round(v[0] / total, 3) if total else 0.0}
                       for c, v in sorted(cats.items(), key=lambda kv: -kv[1][0])},
        "top_kernels": [{"name": n[:160], "category": c, "ms": ms(v[0]), "n": v[1]}
                        for (n, c), v in sorted(names.items(), key=lambda kv: -kv[1][0])[:top]],
        "engine_steps": len(steps),
        "steps_with_tokens": sum(s["name"] != IDLE_STEP for s in steps),
        "steps": [{"name": s["name"], "ms": ms(s["dur"]), "kernel_ms": ms(sum(p.values())),
                   "categories": {c: ms(v) for c, v in sorted(p.items(), key=lambda kv: -kv[1])[:5]}}
                  for s, p in list(zip(steps, per_step))[:max_steps]],
        "outside_steps_kernel_ms": ms(outside),
        "plugin_python": [{"function": f, "ms": ms(v[0]), "n": v[1]}
                          for f, v in sorted(py.items(), key=lambda kv: -kv[1][0])[:top]],
    }
