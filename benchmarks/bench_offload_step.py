"""Profile one offload decode step outside vLLM: where the time of the hierarchical-KV path goes.

One command, prints one JSON object (and writes it to --out) plus torch profiler tables:
    python benchmarks/bench_offload_step.py [--batch 16 --context 8192 --cache-gib 2 --steps 8] [--out r.json]

It replays, for `--layers` layers (Llama-3.1-8B KV shape: Hkv 8, D 128, bf16, block 128, page 32, budget 2048),
exactly the calls `SparseServeImpl._forward_offload` makes for a batch of `--batch` decode requests of `--context`
tokens each: `OffloadTier.begin_layer / write_new / resident_slots` (page summaries), the sparse decode
wrapper with the tier's `translate` (page-cache resolve + FlashH2D of the misses), the working-set record and
`OffloadTier.save_inline`. The pages to summarize and `OffloadTier.begin_step` (no host sync: it reads the previous
step's snapshot of the counters) run once per step, as vLLM's metadata builder does, so the per-layer sequence is
free of host syncs. The host
store is filled with random KV first and every layer's page metadata is built, so selections are realistic.
Measured: the wall time per step (synchronized at step ends only), the same step with only the sparse wrapper on
HBM-resident KV (no tier: the compute floor), and a torch.profiler table of the step's top CPU and CUDA ops, with
the step's count of `cudaStreamSynchronize` calls (`syncs_per_step`).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--cache-gib", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from sparseserve_vllm.core.host_kv import HostKVStore
    from sparseserve_vllm.core.offload_tier import OffloadTier
    from sparseserve_vllm.core.working_set import WorkingSetTracker, page_bytes
    from sparseserve_vllm.kernels import SparseDecodeWrapper, build_page_metadata

    dev = torch.device("cuda")
    hkv, d, hq, bs, ps, dt = 8, 128, 32, 128, 32, torch.bfloat16
    ppb = bs // ps
    blocks_per_req = -(-(a.context + a.steps + 1) // bs)
    nblocks = a.batch * blocks_per_req
    host = HostKVStore(a.layers, nblocks, hkv, bs, d, dt, pin=True)
    for layer in range(a.layers):  # random KV, written through a device buffer
        host.kv[layer].copy_(torch.randn(host.kv[layer].shape, dtype=dt, device=dev))
    torch.cuda.synchronize()
    page_b = ps * 2 * d * 2
    slots = int(a.cache_gib * 2**30) // page_b
    cache = torch.empty((slots, ps, 2 * d), dtype=dt, device=dev)
    tier = OffloadTier(host=host, cache_pages=cache, page_size=ps, max_tokens=8192)
    meta = [torch.empty((nblocks * hkv * ppb, 2, d), dtype=dt, device=dev) for _ in range(a.layers)]
    for layer in range(a.layers):  # page summaries of every page, built from the host KV
        pages = host.pages(layer, ps)
        for c in range(0, pages.shape[0], 65536):
            chunk = pages[c:c + 65536].to(dev)
            build_page_metadata(chunk, meta[layer][c:c + 65536], torch.arange(chunk.shape[0], device=dev),
                                selector="cuboid_mean")
    wrapper = SparseDecodeWrapper(num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=ps, ppb=ppb,
                                  selector="cuboid_mean", token_budget=2048, device=dev, dtype=dt)
    wrapper.plan(a.batch, blocks_per_req * ppb)
    tracker = WorkingSetTracker(a.layers, tier.pages_per_layer, page_bytes(page_size=ps, head_dim=d, element_size=2),
                                window=12, device=dev, check_bounds=False)
    block_table = torch.arange(nblocks, dtype=torch.int32, device=dev).view(a.batch, blocks_per_req)
    seq_lens = torch.full((a.batch,), a.context, dtype=torch.int32, device=dev)
    scale = d ** -0.5

    def step(i: int, offload: bool = True) -> None:
        lens = seq_lens + i + 1
        pos = lens.long() - 1
        slot_mapping = block_table.gather(1, (pos // bs)[:, None]).squeeze(1).long() * bs + pos % bs
        filled = ((pos + 1) % ps == 0)
        summ = tier.token_pages(slot_mapping[filled]).reshape(-1)  # the builder's summarize_slots (once per step)
        if offload:
            tier.begin_step()  # the builder's step start
        for layer in range(a.layers):
            q = torch.randn((a.batch, hq, d), dtype=dt, device=dev)
            k = torch.randn((a.batch, hkv, d), dtype=dt, device=dev)
            v = torch.randn((a.batch, hkv, d), dtype=dt, device=dev)
            if not offload:
                wrapper.run(q, cache, meta[layer], block_table % (slots // (hkv * ppb)), lens, scale)
                continue
            tier.begin_layer()
            tier.write_new(layer, k, v, slot_mapping)
            if summ.numel():
                cached = tier.resident_slots(layer, summ).to(torch.long)
                fresh = torch.empty((cached.numel(), 2, d), dtype=dt, device=dev)
                build_page_metadata(cache[cached], fresh, torch.arange(cached.numel(), device=dev),
                                    selector="cuboid_mean")
                meta[layer][summ] = fresh

            def translate(s, n, layer=layer):
                flat = torch.where(n > 0, s, -1).reshape(-1)
                return tier.resolve(layer, flat).view(s.shape).clamp_min(0)

            wrapper.run(q, cache, meta[layer], block_table, lens, scale, translate=translate)
            tracker.record(layer, torch.where(wrapper.last_page_lens > 0, wrapper.last_slots, -1))
            tier.save_inline(layer, k, v, slot_mapping)
        if offload:
            tracker.end_step()

    def timed(offload: bool) -> list[float]:
        times = []
        for i in range(a.steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step(i, offload)
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - t))
        return times

    timed(True)  # warm-up: compiles kernels, fills the cache
    before = tier.stats()
    offload_ms = timed(True)
    after = tier.stats()
    hbm_ms = timed(False)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(a.steps, True)
        torch.cuda.synchronize()
    table_cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    table_cuda = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    syncs = sum(e.count for e in prof.key_averages() if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    print(table_cpu)
    print(table_cuda)
    tier.close()
    res = {
        "benchmark": "offload_decode_step", "device": torch.cuda.get_device_name(), "batch": a.batch,
        "context": a.context, "layers": a.layers, "cache_gib": a.cache_gib, "cache_slots": slots,
        "offload_step_ms": [round(x, 2) for x in offload_ms], "hbm_only_step_ms": [round(x, 2) for x in hbm_ms],
        "offload_step_ms_median": round(sorted(offload_ms)[len(offload_ms) // 2], 2),
        "hbm_only_step_ms_median": round(sorted(hbm_ms)[len(hbm_ms) // 2], 2),
        "tier_delta": {k: after[k] - before[k] for k in after},
        "syncs_per_step": syncs - 1,  # minus the synchronize that closes the profiled step
    }
    res["ratio_offload_vs_hbm"] = round(res["offload_step_ms_median"] / res["hbm_only_step_ms_median"], 2)
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
        with open(a.out.replace(".json", "-profile.txt"), "w") as f:
            f.write(table_cpu + "\n" + table_cuda + "\n")


if __name__ == "__main__":
    main()
