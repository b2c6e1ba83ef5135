"""GPU benchmark: the Triton `PageCache.resolve`, fused (one program, each (block, warps) tier) vs five launches.

One command, one JSON object (also written to `--out`):

    python benchmarks/bench_resolve.py [--sizes 8,512,4096] [--reps 32] [--out resolve.json]

For each call size N (ids per resolve: a decode step's new tokens are `Hkv` per request, a request's selection
`Hkv x budget / page_size`, 512 for Llama-3.1-8B at budget 2048) and two cases, `hits` (the same N pages every
call: all cached after the first) and `misses` (two disjoint sets of N pages alternating in a cache of N + 64
slots: every page misses and evicts), it times `begin_layer()` + `resolve(0, pages)` captured `--reps` times in
one CUDA graph, replayed 10 times (CUDA events), as microseconds per call, for the five-launch path and for every
fused `(block, warps)` with `block >= N`. The results of every configuration are checked equal to the five
launches' before timing. Prints the best fused configuration per size.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from sparseserve_vllm.core.page_cache import PageCache
from sparseserve_vllm.kernels import page_cache_resolve as pcr

BLOCKS, WARPS = (32, 256, 512, 1024), (1, 2, 4, 8)


def _case(n: int, case: str):
    if case == "hits":
        cache = PageCache(1, 4 * n, 2 * n + 64, device="cuda")
        sets = [torch.arange(n, device="cuda")] * 2
    else:
        cache = PageCache(1, 4 * n, n + 64, device="cuda")
        sets = [torch.arange(n, device="cuda"), torch.arange(n, 2 * n, device="cuda")]
    return cache, sets


def _outputs(n: int, case: str) -> list[list[int]]:
    cache, sets = _case(n, case)
    out = []
    for i in range(4):
        cache.begin_step()
        out += [t.tolist() for t in cache.resolve(0, sets[i % 2])]
    return out


def _time(n: int, case: str, reps: int) -> float:
    cache, sets = _case(n, case)
    for i in range(4):  # warm-up: compiled, cached
        cache.begin_step()
        cache.resolve(0, sets[i % 2])
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for i in range(reps):
            cache.begin_layer()
            cache.resolve(0, sets[i % 2])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (10 * reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8,512,4096")
    ap.add_argument("--reps", type=int, default=32)
    ap.add_argument("--out")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_resolve.py needs a CUDA device")
    saved = pcr.FUSED_LAUNCH
    res = {"device": torch.cuda.get_device_name(), "default_tiers": [list(t) for t in saved], "sizes": {}}
    try:
        for n in (int(x) for x in a.sizes.split(",")):
            row = {}
            for case in ("hits", "misses"):
                pcr.FUSED_LAUNCH = ()
                want = _outputs(n, case)
                times = {"five-launches": _time(n, case, a.reps)}
                for block in (b for b in BLOCKS if b >= n):
                    for warps in WARPS:
                        pcr.FUSED_LAUNCH = ((block, warps),)
                        if _outputs(n, case) != want:
                            sys.exit(f"fused block={block} warps={warps} differs from the five launches at N={n}")
                        times[f"fused block={block} warps={warps}"] = _time(n, case, a.reps)
                times = {k: round(v, 2) for k, v in times.items()}
                fused = {k: v for k, v in times.items() if k != "five-launches"}
                row[case] = {"us_per_call": times, "best_fused": min(fused, key=fused.get) if fused else None}
                print(json.dumps({"n": n, "case": case, **row[case]}), flush=True)
            res["sizes"][str(n)] = row
    finally:
        pcr.FUSED_LAUNCH = saved
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
