"""Count the operations (torch ops and Triton launches: each one GPU kernel or copy on CUDA) that one offload decode
layer issues, per call.

CPU-runnable proxy for the offload decode step's fixed cost: under full CUDA graphs every such op is one graph node
of a few microseconds, so ops per layer x layers bounds how much of a step is small-kernel overhead. Replays, for
one layer of a Llama-3.1-8B KV shape (Hkv 8, D 128, bf16, block 128, page 32, budget 2048 = 64 pages per KV head),
the tier calls `SparseServeImpl._forward_offload` makes: `begin_layer`, `write_new` (the step's tokens written
through, their pages made resident), `resolve` (the selected pages; FlashH2D of the misses), the working-set
`record` and `save_inline`; `cache.resolve` is the page cache's part of `resolve` alone. Counted with torch.profiler:
leaf `aten::` ops minus those that launch nothing (views, empty, dtype no-ops, CPU scalars); a composite op counts
its leaf children (a CPU sort or index_put_ as its copies), so this is a proxy for the CUDA kernel count, not that
count itself. The count does not depend on the batch size (every op is batched). The script sets
`TRITON_INTERPRET=1`, so the tier runs the Triton kernels it runs on CUDA (the page cache's resolve, FlashH2D, the
FlashD2H scatter): each launch counts as one op (`triton:<kernel>`), and the torch ops the interpreter runs inside a
launch are not counted.

    python benchmarks/count_offload_ops.py [--batch 1] [--context 4096] [--out benchmarks/results/offload-ops-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the tier takes its GPU (Triton) paths

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from triton.runtime import interpreter

NO_KERNEL = {"aten::empty", "aten::view", "aten::slice", "aten::select", "aten::as_strided", "aten::as_strided_",
             "aten::reshape", "aten::_reshape_alias", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::t",
             "aten::alias", "aten::resize_", "aten::empty_strided", "aten::lift_fresh", "aten::detach",
             "aten::_unsafe_view", "aten::permute", "aten::transpose", "aten::item", "aten::_local_scalar_dense",
             "aten::is_nonzero", "aten::unbind", "aten::narrow", "aten::empty_like", "aten::result_type",
             "aten::flatten", "aten::to", "aten::scalar_tensor"}


_launch = interpreter.GridExecutor.__call__


def _named_launch(executor, *args, **kwargs):
    with record_function(f"triton:{executor.fn.__name__}"):
        return _launch(executor, *args, **kwargs)


interpreter.GridExecutor.__call__ = _named_launch


def _in_triton(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith("triton:"):
            return True
        p = p.cpu_parent
    return False


# Composite ops that launch a kernel of their own besides their aten children (on the CPU the index kernel of
# index_put_ shows as no op at all).
KERNEL_WITH_CHILDREN = {"aten::_index_put_impl_"}


def kernel_ops(fn) -> Counter:
    """Triton launches and leaf aten ops (outside launches) of one call of `fn` that launch work on a device."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = Counter()
    for e in prof.events():
        leaf = not any(c.name.startswith("aten::") for c in e.cpu_children)
        if e.name.startswith("triton:") or (e.name.startswith("aten::") and e.name not in NO_KERNEL and not _in_triton(e)
                                            and (leaf or e.name in KERNEL_WITH_CHILDREN)):
            ops[e.name] += 1
    return ops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from sparseserve_vllm.core.host_kv import HostKVStore
    from sparseserve_vllm.core.offload_tier import OffloadTier
    from sparseserve_vllm.core.working_set import WorkingSetTracker, page_bytes

    layers, hkv, d, bs, ps, k_sel, dt = 2, 8, 128, 128, 32, 64, torch.bfloat16
    ppb, bpr = bs // ps, -(-(a.context + 8) // bs)
    nblocks = a.batch * bpr
    host = HostKVStore(layers, nblocks, hkv, bs, d, dt, pin=False)
    tier = OffloadTier(host=host, cache_pages=torch.empty((a.batch * hkv * k_sel * 4, ps, 2 * d), dtype=dt),
                       page_size=ps, max_tokens=8192)
    tracker = WorkingSetTracker(layers, tier.pages_per_layer, page_bytes(page_size=ps, head_dim=d, element_size=2),
                                window=12, device="cpu", check_bounds=False)
    block_table = torch.arange(nblocks).view(a.batch, bpr)
    gen = torch.Generator().manual_seed(0)
    counts = {}
    for step in range(3):  # the last step, warm cache, is counted
        tier.begin_step()
        lens = torch.full((a.batch,), a.context + step + 1)
        slot_mapping = block_table.gather(1, ((lens - 1) // bs)[:, None]).squeeze(1) * bs + (lens - 1) % bs
        for layer in range(layers):
            k, v = (torch.randn((a.batch, hkv, d), generator=gen).to(dt) for _ in range(2))
            sel = torch.stack([torch.randperm(a.context // ps, generator=gen)[:k_sel]
                               for _ in range(a.batch * hkv)]).view(a.batch, hkv, k_sel)
            blk = block_table.gather(1, (sel // ppb).view(a.batch, -1)).view(a.batch, hkv, k_sel)
            pages = ((blk * hkv + torch.arange(hkv)[None, :, None]) * ppb + sel % ppb).reshape(-1)
            calls = {
                "begin_layer": tier.begin_layer,
                "write_new": lambda: tier.write_new(layer, k, v, slot_mapping),
                "resolve": lambda: tier.resolve(layer, pages),
                "cache.resolve": lambda: tier.cache.resolve(layer, pages),
                "record": lambda: tracker.record(layer, pages.view(a.batch, hkv, k_sel)),
                "save_inline": lambda: tier.save_inline(layer, k, v, slot_mapping),
            }
            for name, fn in calls.items():
                if step == 2:
                    counts[name] = kernel_ops(fn)
                else:
                    fn()
        tracker.end_step()
    per_layer = sum(sum(c.values()) for n, c in counts.items() if n != "cache.resolve")
    result = {"batch": a.batch, "context": a.context, "device": "cpu", "torch": torch.__version__,
              "ops_per_layer": per_layer, "ops_per_step_32_layers": 32 * per_layer,
              "calls": {n: {"ops": sum(c.values()), "by_op": dict(c.most_common())} for n, c in counts.items()}}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
