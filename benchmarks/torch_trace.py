"""Summaries of torch profiler Chrome traces (as vLLM's `profiler_config` writes them), for the GPU benchmarks.

`load_trace_events(files)` reads the trace files (gzipped or not); `summarize_trace(events)` returns device-kernel
time by category (SparseServe's own Triton kernels by name, attention, GEMM, memcpy each way, memset, other), the
top kernels, each engine step's kernel time (vLLM's `execute_context_*` markers) and the CPU time of the plugin's
Python functions (when the trace has Python stacks). Without device events (a CPU run) it counts `cpu_op` self time,
so a dry run on the CPU build gives a non-empty summary. `summarize_decode_steps(events)` does the same per step for
the steady decode steps of the window, and adds GPU busy and idle time, CUDA-graph replays and host syncs.
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
_STEP_NAME = re.compile(r"^execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)$")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # in built-ins' frame names (`<built-in method tolist of Tensor object ..>`)
HOST_API_CATS = ("cuda_runtime", "cuda_driver")  # host CUDA API calls; a device event names its call's `correlation`


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


def _union_us(intervals) -> float:
    """The length of the union of `(start, end)` intervals (overlap counts once)."""
    busy, end = 0.0, float("-inf")
    for ts, te in sorted(intervals):
        if te > end:
            busy += te - max(ts, end)
            end = te
    return busy


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
    busy = _union_us((e["ts"], e["ts"] + e["dur"]) for e, _, _ in dev)
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


def _is_decode_step(name: str) -> bool:
    """An engine step of generation (decode) requests only: no context request (one without an output token yet)."""
    m = _STEP_NAME.match(name)
    return m is not None and m.group(1) == "0" and m.group(3) != "0"


def _short_frame(name: str) -> str:
    """A `python_function` name (`<file>(<line>): <function>`) from the package folder on (`vllm/...`, `torch/...`,
    `sparseserve_vllm/...`)."""
    for mark in ("site-packages/", "sparseserve_vllm/"):
        i = name.rfind(mark)
        if i >= 0:
            return name[i + len(mark):] if mark == "site-packages/" else name[i:]
    return name


def _call_sites(xs, calls) -> dict:
    """`{id(call): (site, innermost sparseserve_vllm frame)}` of host API calls, from the `python_function` events
    (a trace with stacks) open on the call's thread when it started: the site is the innermost Python frame, followed
    by the built-in it called when the innermost frame is one (`... > <built-in method tolist of Tensor object>`);
    `(None, None)` without frames."""
    frames = defaultdict(list)
    for e in xs:
        if e.get("cat") == "python_function":
            frames[(e.get("pid"), e.get("tid"))].append(e)
    by_thread = defaultdict(list)
    for c in calls:
        by_thread[(c.get("pid"), c.get("tid"))].append(c)
    out = {}
    for key, cs in by_thread.items():
        evs = sorted(frames.get(key, []), key=lambda e: (e["ts"], -e["dur"]))
        stack, j = [], 0  # the frames open at the current call, outermost first (Python frames nest)
        for c in sorted(cs, key=lambda e: e["ts"]):
            while j < len(evs) and evs[j]["ts"] <= c["ts"]:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] <= evs[j]["ts"]:
                    stack.pop()
                stack.append(evs[j])
                j += 1
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= c["ts"]:
                stack.pop()
            names = [_ADDRESS.sub("", _short_frame(f["name"])) for f in stack]
            frame = next((n for n in reversed(names) if not n.startswith("<")), None)
            site = f"{frame} > {names[-1]}" if names and names[-1].startswith("<") else frame
            out[id(c)] = (site, next((n for n in reversed(names) if n.startswith("sparseserve_vllm/")), None))
    return out


def summarize_decode_steps(events, skip: int = 1, top: int = 15) -> dict:
    """Where the time of the steady decode steps of one profiled window went, per step (times in ms, counts per step).
    - Counted steps: the longest run of consecutive engine steps (`execute_context_*`) that are decode steps of one
      batch size (the same `execute_context_0(0)_generation_<n>(<n>)`, n > 0), less its first `skip` steps and less
      its last step when no engine step follows it. A counted step's interval runs from its annotation's start to
      the next step's start, so it holds its `execute_model` (the annotation), its `sample_tokens` and the engine's
      work between steps; the window runs from the first counted step's start to the start of the step after the
      last.
    - Device events (kernels, memcpys, memsets) belong to the step whose interval holds their launch call (the
      `cuda_runtime`/`cuda_driver` event of the same `correlation`); other events to the step holding their start.
    - `per_step`: `step_ms` (window / steps, as profiled), `execute_model_cpu_ms` (the annotations' mean duration),
      and with device events `gpu_busy_ms` (the union of the window's device intervals), `gpu_idle_ms` (first device
      start to last device end, less busy), `kernels`, `kernel_ms` (kernels only, summed), `device_events`,
      `host_syncs` and `host_sync_ms` (the blocking calls of `host_sync_calls`: their count and host time).
    - `cuda_graphs`: graph replays (`*GraphLaunch*` API calls in the window) and the device events correlated with
      them: `graph_kernels_seen` (null without replays; false when the trace holds replays but none of their
      device events, and `gpu_busy_source` then says that busy time misses the graphs), per step `launches`,
      `launch_cpu_ms`, and with device events `kernels`, `kernel_ms` (the replays' kernels), `span_ms` (each
      replay's first device event start to last end), `busy_ms` (union within each replay), `gap_ms` (span - busy:
      the GPU idle between a replay's kernels), `eager_kernels`, `eager_kernel_ms` (kernels of no replay).
    - `host_sync_calls`: `{call: {n, ms, blocking}}` per step: `*Synchronize*` API calls (stream, device, event,
      context; blocking) and memcpy calls whose device copy is device-to-host, keyed with the copy's name (blocking:
      the non-async ones and those to pageable memory; torch's `.tolist()`/`.item()` is one to pageable memory
      followed by a `cudaStreamSynchronize`, so it counts as two blocking calls). `sync_sites`: the blocking calls
      grouped by the innermost Python frame open at the call and its innermost `sparseserve_vllm/` frame (both null
      without stacks), the `top` by host time.
    - `categories`, `top_kernels`, `plugin_python`, `source`: `summarize_trace` of the window's events, per step
      (`ms` and `n` divided by the counted steps). Without device events (the CPU build) `source` says so, the
      categories are `cpu_op` self time and the device fields are absent.
    - `steps`: each counted step: `name`, `cpu_ms` (its annotation), `ms` (its interval), `host_syncs`, and with
      device events `kernels`, `kernel_ms`, `busy_ms`, `h2d_ms` (host-to-device memcpys and FlashH2D kernels)."""
    xs = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    steps = sorted((e for e in xs if e.get("cat") == "user_annotation" and e.get("name", "").startswith(STEP_PREFIX)),
                   key=lambda e: e["ts"])
    best, start = (0, 0), None  # the longest run of decode steps of one batch size, [start, end)
    for i, s in enumerate(steps + [None]):
        if start is not None and (s is None or s["name"] != steps[start]["name"]):
            best = max(best, (start, i), key=lambda r: r[1] - r[0])
            start = None
        if start is None and s is not None and _is_decode_step(s["name"]):
            start = i
    first = best[0] + skip
    counted = steps[first:min(best[1], len(steps) - 1)]
    res = {"engine_steps": len(steps), "decode_steps": sum(_is_decode_step(s["name"]) for s in steps),
           "steps_counted": len(counted), "skip": skip}
    if not counted:
        return dict(res, error=f"no decode step to count: the longest run of decode steps of one batch size has "
                               f"{best[1] - best[0]} (it needs skip + 1 and a step after the last)")
    n = len(counted)
    starts = [s["ts"] for s in counted] + [steps[first + n]["ts"]]
    t0, t1 = starts[0], starts[-1]
    api = [e for e in xs if e.get("cat") in HOST_API_CATS]
    api_by_corr = {e["args"]["correlation"]: e for e in api if "correlation" in e.get("args", {})}
    copies = {e["args"]["correlation"]: e for e in xs
              if e.get("cat") == "gpu_memcpy" and "correlation" in e.get("args", {})}

    def launched(e):
        call = api_by_corr.get(e.get("args", {}).get("correlation"))
        return e["ts"] if call is None else call["ts"]

    dev = [(e, launched(e)) for e in xs if e.get("cat") in DEVICE_CATS]
    dev = [(e, t) for e, t in dev if t0 <= t < t1]
    api = [e for e in api if t0 <= e["ts"] < t1]
    window = [e for e, _ in dev] + [e for e in xs if e.get("cat") not in DEVICE_CATS and t0 <= e["ts"] < t1]

    def ms(us):  # per counted step
        return round(us / 1e3 / n, 3)

    def per(count):  # per counted step
        return round(count / n, 2)

    syncs = {}  # call key -> [us, count, blocking]
    blocking = []
    for c in api:
        name = c["name"]
        if "Synchronize" in name:
            key, blocks = name, True
        elif "memcpy" in name.lower():
            copy = copies.get(c.get("args", {}).get("correlation"))
            kind = copy["name"] if copy is not None else ""
            if "DtoH" not in kind and "DtoH" not in name:
                continue
            key, blocks = f"{name} [{kind}]" if kind else name, "Async" not in name or "Pageable" in kind
        else:
            continue
        v = syncs.setdefault(key, [0.0, 0, blocks])
        v[0] += c["dur"]
        v[1] += 1
        if blocks:
            blocking.append(c)
    sites = defaultdict(lambda: [0.0, 0])
    where = _call_sites(xs, blocking)
    for c in blocking:
        v = sites[where[id(c)]]
        v[0] += c["dur"]
        v[1] += 1

    per_step = {"step_ms": ms(t1 - t0), "execute_model_cpu_ms": ms(sum(s["dur"] for s in counted))}
    rows = [{"name": s["name"], "cpu_ms": round(s["dur"] / 1e3, 3), "ms": round((b - a) / 1e3, 3), "host_syncs": 0}
            for s, a, b in zip(counted, starts, starts[1:])]
    for c in blocking:
        rows[bisect.bisect_right(starts, c["ts"]) - 1]["host_syncs"] += 1
    if dev:
        kernels = [e for e, _ in dev if e["cat"] == "kernel"]
        busy = _union_us((e["ts"], e["ts"] + e["dur"]) for e, _ in dev)
        extent = max(e["ts"] + e["dur"] for e, _ in dev) - min(e["ts"] for e, _ in dev)
        per_step.update(gpu_busy_ms=ms(busy), gpu_idle_ms=ms(extent - busy), kernels=per(len(kernels)),
                        kernel_ms=ms(sum(e["dur"] for e in kernels)), device_events=per(len(dev)))
        by_step = [[] for _ in counted]
        for e, t in dev:
            by_step[bisect.bisect_right(starts, t) - 1].append(e)
        for row, evs in zip(rows, by_step):
            ks = [e for e in evs if e["cat"] == "kernel"]
            row.update(kernels=len(ks), kernel_ms=round(sum(e["dur"] for e in ks) / 1e3, 3),
                       busy_ms=round(_union_us((e["ts"], e["ts"] + e["dur"]) for e in evs) / 1e3, 3),
                       h2d_ms=round(sum(e["dur"] for e in evs if kernel_category(e.get("name", ""), e["cat"])
                                        in ("memcpy_htod", "sparseserve:flash_h2d")) / 1e3, 3))
    per_step.update(host_syncs=per(len(blocking)), host_sync_ms=ms(sum(c["dur"] for c in blocking)))

    launches = [c for c in api if "GraphLaunch" in c["name"]]
    replay = defaultdict(list)  # correlation of a graph launch -> its device events
    graph_corr = {c.get("args", {}).get("correlation") for c in launches}
    for e, _ in dev:
        corr = e.get("args", {}).get("correlation")
        if corr in graph_corr:
            replay[corr].append(e)
    graphs = {"graph_kernels_seen": bool(replay) if launches else None, "launches": per(len(launches)),
              "launch_cpu_ms": ms(sum(c["dur"] for c in launches))}
    if dev:
        span = sum(max(e["ts"] + e["dur"] for e in evs) - min(e["ts"] for e in evs) for evs in replay.values())
        inside = sum(_union_us((e["ts"], e["ts"] + e["dur"]) for e in evs) for evs in replay.values())
        in_graph = [e for evs in replay.values() for e in evs if e["cat"] == "kernel"]
        graph_ids = {id(e) for e in in_graph}
        eager = [e for e, _ in dev if e["cat"] == "kernel" and id(e) not in graph_ids]
        graphs.update(kernels=per(len(in_graph)), kernel_ms=ms(sum(e["dur"] for e in in_graph)),
                      span_ms=ms(span), busy_ms=ms(inside), gap_ms=ms(span - inside), eager_kernels=per(len(eager)),
                      eager_kernel_ms=ms(sum(e["dur"] for e in eager)))
    if not dev:
        source = "none: the trace has no device events (a CPU-only profile)"
    elif launches and not replay:
        source = (f"eager device events only: the window holds {len(launches)} CUDA-graph launches but none of their "
                  "kernels, so gpu_busy_ms misses the graphs' GPU time (and gpu_idle_ms counts it as idle)")
    else:
        source = "device events launched in the counted steps" + (", CUDA-graph replays' kernels included"
                                                                  if replay else "")

    summary = summarize_trace(window, top=top)
    return dict(
        res, per_step=per_step, gpu_busy_source=source, cuda_graphs=graphs, source=summary["source"],
        host_sync_calls={k: {"n": per(v[1]), "ms": ms(v[0]), "blocking": v[2]}
                         for k, v in sorted(syncs.items(), key=lambda kv: -kv[1][0])},
        sync_sites=[{"site": s, "plugin_frame": p, "n": per(v[1]), "ms": ms(v[0])}
                    for (s, p), v in sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]],
        categories={c: {"ms": round(v["ms"] / n, 3), "n": per(v["n"])} for c, v in summary["categories"].items()},
        top_kernels=[dict(k, ms=round(k["ms"] / n, 3), n=per(k["n"])) for k in summary["top_kernels"]],
        plugin_python=[dict(f, ms=round(f["ms"] / n, 3), n=per(f["n"])) for f in summary["plugin_python"]],
        steps=rows)
