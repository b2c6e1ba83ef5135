"""Benchmark FlashD2H in both modes ("uva": the GPU scatters into the pinned store through UVA; "staged": one
contiguous D2H copy + CPU-thread scatter) against per-fragment copies and one contiguous copy, and their effect on
concurrent matmuls on the compute stream.

One command, prints one JSON object (and writes it to --out PATH):
    python benchmarks/bench_flash_d2h.py [--tokens 64,8192,32768] [--threads 4,8,16] [--sms 8,16,32]
                                         [--out result.json]

Setup (Llama-3.1-8B KV shape): 32 layers, Hkv 8, D 128, bf16, so 4 KiB of new K+V per token per layer;
block_size 128, page_size 32. One step saves T new tokens in every layer. For T = 64 (a decode batch) each token
gets a random slot in its own random block (a random offset); for larger T (prefill) tokens fill random whole
blocks in order. Keys and values are random device tensors [T, 8, 128], distinct per layer.
Measured, as GB/s of new KV bytes (32 * T * 4 KiB per step), end to end until the data is in the host store's
page layout (wall clock from the first save to the return of wait_all(), the GPU idle otherwise):
  (a) FlashD2HSaver in staged mode for every thread count in --threads (`flash_d2h`) and in uva mode for every
      program count in --sms (`flash_d2h_uva`), parts of --max-tokens (default: the largest --tokens, so one part
      per layer save, as the plugin stages a layer-segmented save), a ring of --staging-tokens (default: two
      parts); also the time the caller spends inside save() calls;
  (b) the memcpy baseline: the new tokens already sit in an HBM cache in the HND layout (as vLLM writes them)
      and every contiguous fragment of them in that layout (one page of one head for prefill, one token of one
      head for decode) is copied with its own `copy_(non_blocking=True)`; run on --frag-layers layers to bound
      its run time;
  (c) the ceiling: one contiguous D2H copy of the step's bytes into pinned memory (and, as
      `contiguous_per_layer_gbps`, one contiguous copy per layer, the granularity at which new KV appears).
Checked before timing: after (a) and (b) the host store holds exactly cat(K, V) of every token at its slot, for
every layer (the script exits non-zero otherwise).
Host ceilings (no GPU involved): the scatter alone (ring rows -> store rows, numpy, the staged saver's inner
operation) with 1 and each --threads count, and a plain multi-threaded host memcpy, for 32 layers x 8192 tokens.
Interference: per layer, --mm-per-layer matmuls [T, 4096] @ [4096, 14336] on the compute stream (a stand-in for
the layer's MLP), timed with CUDA events on the compute stream alone and with FlashD2H saving each layer's KV
right after its matmuls; `slowdown` = with / alone (goal ~1.0). Reported in `interference` for the staged saver
with the most threads and in every `flash_d2h_uva` entry for that program count (the scatter kernel shares the
SMs with the matmuls; the staged saver only adds its pack kernel and a copy-engine transfer).
  (d) for prefill sizes, `FlashD2HSaver.save_blocks` (uva mode, the fewest --sms): the step's tokens fill whole blocks
      whose ids are consecutive (a fresh request), descending (vLLM's free queue hands a finished request's blocks
      back tail first) or random (the worst case: every block its own copy-engine run); `flash_d2h_blocks`, with
      the interference measured the same way.
`ratio` = saver GB/s / contiguous GB/s of the same run (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparseserve_vllm.core.block_runs import plan_block_runs  # noqa: E402
from sparseserve_vllm.core.flash_d2h import FlashD2HSaver  # noqa: E402
from sparseserve_vllm.core.host_kv import HostKVStore  # noqa: E402

LAYERS, HKV, D, BLOCK, PAGE = 32, 8, 128, 128, 32
DTYPE = torch.bfloat16
TOKEN_BYTES = HKV * 2 * D * 2  # per layer


def make_slots(t: int, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    if t <= 256:  # decode: one token in each of t random blocks, random offset
        blocks = torch.randperm(num_blocks, generator=gen)[:t]
        return blocks * BLOCK + torch.randint(0, BLOCK, (t,), generator=gen)
    blocks = torch.randperm(num_blocks, generator=gen)[: (t + BLOCK - 1) // BLOCK]
    return (blocks[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)[:t]


def check_store(host: HostKVStore, keys, values, slots: torch.Tensor, layers) -> bool:
    blk, off = slots // BLOCK, slots % BLOCK
    for layer in layers:
        got = host.kv[layer][blk, :, off]  # [T, Hkv, 2D]
        want = torch.cat((keys[layer], values[layer]), -1).cpu()
        if not torch.equal(got, want):
            return False
    return True


def poison(host: HostKVStore, slots: torch.Tensor, layers) -> None:
    """NaN at every target position, so a check cannot pass on data an earlier variant left there."""
    blk, off = slots // BLOCK, slots % BLOCK
    for layer in layers:
        host.kv[layer][blk, :, off] = float("nan")


def fragments(slots: torch.Tensor):
    """Contiguous runs of the new tokens inside one page of one head: (block, offset_start, offset_end)."""
    s = slots.tolist()
    runs, i = [], 0
    while i < len(s):
        j = i + 1
        while j < len(s) and s[j] == s[j - 1] + 1 and s[j] % PAGE != 0:
            j += 1
        runs.append((s[i] // BLOCK, s[i] % BLOCK, s[i] % BLOCK + (j - i)))
        i = j
    return runs


def host_ceilings(host: HostKVStore, thread_list) -> dict:
    """GB/s of the CPU scatter alone and of a plain host memcpy, by thread count."""
    t = 8192
    gen = torch.Generator().manual_seed(1)
    slots = make_slots(t, host.num_logical_blocks, gen).numpy()
    row = np.dtype((np.void, 2 * D * 2))
    src = torch.empty((LAYERS, t, HKV, 2 * D), dtype=DTYPE)  # one source per layer: not cache-resident
    src.view(torch.int16).fill_(1)
    src_rows = src.view(torch.uint8).numpy().view(row).reshape(LAYERS, -1)
    store_rows = host.kv.view(torch.uint8).numpy().view(row).reshape(LAYERS, -1)
    blk = slots // BLOCK
    rows = ((blk[:, None] * HKV + np.arange(HKV)) * BLOCK + (slots % BLOCK)[:, None]).reshape(-1)
    big = np.ones(LAYERS * t * HKV * 2 * D, dtype=np.int16)
    big2 = np.zeros_like(big)
    out = {"scatter_gbps": {}, "memcpy_gbps": {}}
    for nt in sorted({1, *thread_list}):
        bounds = np.linspace(0, rows.size, nt + 1).astype(np.int64)
        cuts = [(int(bounds[i]), int(bounds[i + 1])) for i in range(nt)]

        def scatter(layer, a, b):
            store_rows[layer][rows[a:b]] = src_rows[layer][a:b]

        def memcpy(layer, a, b):
            n = big.size // LAYERS
            lo, hi = layer * n + a * n // rows.size, layer * n + b * n // rows.size
            np.copyto(big2[lo:hi], big[lo:hi])

        with ThreadPoolExecutor(nt) as pool:
            jobs = [(layer, x, y) for layer in range(LAYERS) for x, y in cuts]
            for name, fn in (("scatter_gbps", scatter), ("memcpy_gbps", memcpy)):
                list(pool.map(lambda job: fn(*job), jobs))  # warm-up (first touch of pages)
                a = time.perf_counter()
                list(pool.map(lambda job: fn(*job), jobs))
                out[name][nt] = round(LAYERS * t * TOKEN_BYTES / (time.perf_counter() - a) / 1e9, 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="64,8192,32768")
    p.add_argument("--threads", default="4,8,16", help="staged mode: scatter thread counts")
    p.add_argument("--sms", default="8,16,32", help="uva mode: scatter program counts (num_sms)")
    p.add_argument("--tile-kib", default="16", help="uva mode: scatter tile sizes in KiB (tile_bytes)")
    p.add_argument("--max-tokens", type=int, help="tokens staged as one piece (default: the largest --tokens)")
    p.add_argument("--staging-tokens", type=int, help="the staging ring's rows (default: 2 x --max-tokens)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--frag-layers", type=int, default=2)
    p.add_argument("--mm-per-layer", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA GPU"}))
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    token_list = [int(x) for x in args.tokens.split(",")]
    args.max_tokens = args.max_tokens or max(token_list)
    args.staging_tokens = args.staging_tokens or 2 * args.max_tokens
    thread_list = [int(x) for x in args.threads.split(",")]
    sms_list = [int(x) for x in args.sms.split(",")]
    tile_list = [int(x) * 1024 for x in args.tile_kib.split(",")]
    num_blocks = max(-(-max(token_list) // BLOCK) * 5 // 4, 128)  # room for the largest step and for random blocks
    t0 = time.perf_counter()
    host = HostKVStore(LAYERS, num_blocks, HKV, BLOCK, D, DTYPE, pin=True)
    alloc_s = time.perf_counter() - t0
    hbm = torch.empty((num_blocks, HKV, BLOCK, 2 * D), dtype=DTYPE, device="cuda")  # one layer's HBM cache
    w = torch.randn((4096, 14336), device="cuda", dtype=DTYPE) / 64
    compute = torch.cuda.current_stream()
    ok = True
    rows = []
    for t in token_list:
        slots_cpu = make_slots(t, num_blocks, gen)
        slots = slots_cpu.cuda()
        keys = [torch.randn((t, HKV, D), device="cuda", dtype=DTYPE) for _ in range(LAYERS)]
        values = [torch.randn((t, HKV, D), device="cuda", dtype=DTYPE) for _ in range(LAYERS)]
        step_bytes = LAYERS * t * TOKEN_BYTES
        row = dict(tokens=t, step_mib=round(step_bytes / 2**20, 2))

        # (c) ceiling: one contiguous D2H copy of the step's bytes
        src = torch.empty(step_bytes // 2, dtype=DTYPE, device="cuda")
        dst = torch.empty(step_bytes // 2, dtype=DTYPE, pin_memory=True)
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(args.steps):
            a = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - a)
        contiguous = step_bytes / statistics.median(times) / 1e9
        row["contiguous_gbps"] = round(contiguous, 2)
        # the same bytes as one contiguous copy per layer (the granularity at which new KV appears)
        per_layer = src.view(LAYERS, -1)
        dst_layers = dst.view(LAYERS, -1)
        times = []
        for _ in range(args.steps):
            a = time.perf_counter()
            for layer in range(LAYERS):
                dst_layers[layer].copy_(per_layer[layer], non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - a)
        row["contiguous_per_layer_gbps"] = round(step_bytes / statistics.median(times) / 1e9, 2)
        del src, dst, per_layer, dst_layers

        def ring_save(saver, layer):
            saver.save(layer, keys[layer], values[layer], slots)

        # (a) FlashD2H, both modes
        def measure(saver, save=ring_save, slots_cpu=slots_cpu) -> dict:
            nonlocal ok
            poison(host, slots_cpu, range(LAYERS))
            for layer in range(LAYERS):
                save(saver, layer)
            saver.wait_all()
            good = check_store(host, keys, values, slots_cpu, range(LAYERS))
            ok &= good
            walls, in_save = [], []
            for _ in range(args.steps):
                torch.cuda.synchronize()
                a = time.perf_counter()
                for layer in range(LAYERS):
                    save(saver, layer)
                b = time.perf_counter()
                saver.wait_all()
                walls.append(time.perf_counter() - a)
                in_save.append(b - a)
            gbps = step_bytes / statistics.median(walls) / 1e9
            return dict(mode=saver.mode, gbps=round(gbps, 2), ratio=round(gbps / contiguous, 3),
                        step_ms=round(statistics.median(walls) * 1e3, 2),
                        in_save_ms=round(statistics.median(in_save) * 1e3, 2), verified=good)

        flash = []
        for nt in thread_list:
            with FlashD2HSaver(host, args.max_tokens, nt, staging_tokens=args.staging_tokens, mode="staged") as saver:
                flash.append(dict(threads=nt, **measure(saver)))
        row["flash_d2h"] = flash

        # (b) memcpy baseline: one copy_ per contiguous fragment of the HBM cache
        runs = fragments(slots_cpu)
        n_layers = min(LAYERS, max(1, args.frag_layers if t > 256 else LAYERS))
        blk, off = slots // BLOCK, slots % BLOCK
        poison(host, slots_cpu, range(n_layers))
        spent = 0.0
        for layer in range(n_layers):
            hbm[blk, :, off] = torch.cat((keys[layer], values[layer]), -1)  # vLLM's cache write (not timed)
            torch.cuda.synchronize()
            a = time.perf_counter()
            dst_l = host.kv[layer]
            for b_, o0, o1 in runs:
                for h in range(HKV):
                    dst_l[b_, h, o0:o1].copy_(hbm[b_, h, o0:o1], non_blocking=True)
            torch.cuda.synchronize()
            spent += time.perf_counter() - a
        good = check_store(host, keys, values, slots_cpu, range(n_layers))
        ok &= good
        row["per_fragment_copy"] = dict(fragments_per_layer=len(runs) * HKV, layers_timed=n_layers,
                                        gbps=round(n_layers * t * TOKEN_BYTES / spent / 1e9, 2), verified=good)

        # Interference with compute on the compute stream
        x = torch.randn((t, 4096), device="cuda", dtype=DTYPE)

        def layer_work():
            for _ in range(args.mm_per_layer):
                torch.mm(x, w)

        def forward(saver, save=ring_save):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(compute)
            for layer in range(LAYERS):
                layer_work()
                if saver is not None:
                    save(saver, layer)
            end.record(compute)
            end.synchronize()
            if saver is not None:
                saver.wait_all()
            return start.elapsed_time(end)

        def with_saver(saver, save=ring_save) -> float:
            forward(saver, save)  # warm-up
            return statistics.median(forward(saver, save) for _ in range(args.steps))

        forward(None)
        alone = statistics.median(forward(None) for _ in range(args.steps))
        with FlashD2HSaver(host, args.max_tokens, max(thread_list), staging_tokens=args.staging_tokens,
                           mode="staged") as saver:
            with_save = with_saver(saver)
        row["interference"] = dict(mode="staged", threads=max(thread_list), matmuls=LAYERS * args.mm_per_layer,
                                   compute_alone_ms=round(alone, 3), compute_with_flash_d2h_ms=round(with_save, 3),
                                   slowdown=round(with_save / alone, 4))

        # (a) and interference for the uva mode, per program count
        uva = []
        for sms, tile in ((s, t) for s in sms_list for t in tile_list):
            with FlashD2HSaver(host, args.max_tokens, staging_tokens=args.staging_tokens, mode="uva",
                               num_sms=sms, tile_bytes=tile) as saver:
                entry = dict(sms=sms, tile_kib=tile // 1024, **measure(saver))
                with_save = with_saver(saver)
            entry.update(compute_alone_ms=round(alone, 3), compute_with_flash_d2h_ms=round(with_save, 3),
                         slowdown=round(with_save / alone, 4))
            uva.append(entry)
        row["flash_d2h_uva"] = uva

        # (d) whole-block saves (`save_blocks`, a layer-segmented prompt): runs of consecutive block ids by the
        # copy engine; three block-id layouts of the same number of blocks
        if t % BLOCK == 0 and t > 256:
            m = t // BLOCK
            layouts = dict(consecutive=torch.arange(m), reversed=torch.arange(m - 1, -1, -1),
                           random=torch.randperm(num_blocks, generator=gen)[:m])
            blocks = []
            for name, ids in layouts.items():
                ids_list = ids.tolist()
                block_slots = (ids[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)

                def block_save(saver, layer, ids_list=ids_list):
                    saver.save_blocks(layer, keys[layer], values[layer], ids_list)

                with FlashD2HSaver(host, args.max_tokens, staging_tokens=args.staging_tokens, mode="uva",
                                   num_sms=min(sms_list)) as saver:
                    entry = dict(block_ids=name, copies_per_layer=len(
                        plan_block_runs(ids_list, BLOCK * TOKEN_BYTES, saver.min_copy_bytes).runs),
                        **measure(saver, block_save, block_slots))
                    with_save = with_saver(saver, block_save)
                entry.update(compute_alone_ms=round(alone, 3), compute_with_flash_d2h_ms=round(with_save, 3),
                             slowdown=round(with_save / alone, 4))
                blocks.append(entry)
            row["flash_d2h_blocks"] = blocks
        rows.append(row)
        del keys, values, x

    report = dict(
        benchmark="flash_d2h",
        device=torch.cuda.get_device_properties(0).name,
        host_cpus=os.cpu_count(),
        torch=torch.__version__,
        shape=dict(layers=LAYERS, kv_heads=HKV, head_dim=D, block_size=BLOCK, page_size=PAGE, dtype=str(DTYPE)),
        host_store_gib=round(host.nbytes / 2**30, 2),
        pinned_alloc_s=round(alloc_s, 2),
        max_tokens=args.max_tokens,
        staging_tokens=args.staging_tokens,
        host_ceilings=host_ceilings(host, thread_list),
        results=rows,
        goal_ratio=0.9,
        all_verified=bool(ok),
    )
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
