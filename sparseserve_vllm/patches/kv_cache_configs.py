"""Patch: `vllm.v1.engine.core.get_kv_cache_configs` -- the KV capacity split for `offload` (see the ledger).

With offload on, vLLM's scheduler must see the LOGICAL capacity (`host_kv_gib` of pinned host memory, shared evenly
by the workers of a tensor-parallel engine: each holds its own KV heads), while each worker allocates only the HBM
page cache (`hbm_cache_gib`, per GPU). The wrapper asks the original for configs sized by each worker's share of
`host_kv_gib` (so `num_blocks`, max-model-len checks and concurrency are computed for the host tier), then replaces
the per-layer tensors with ONE tensor of `hbm_cache_gib` shared by every attention layer: the HBM page pool that
`OffloadTier` manages. Without offload it returns the original's result untouched.
"""

from __future__ import annotations

import functools
import math

import vllm.v1.engine.core as engine_core
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheConfig, KVCacheTensor

from sparseserve_vllm.adapter.config_access import selected, sparseserve_config
from sparseserve_vllm.config import SparseServeConfigError

GIB = 1 << 30
_ORIGINAL = engine_core.get_kv_cache_configs


def offload_configs(vllm_config, kv_cache_specs, available_memory):
    cfg = sparseserve_config(vllm_config)
    host_bytes = int(cfg.host_kv_gib * GIB) // len(available_memory)  # one share per worker
    configs = _ORIGINAL(vllm_config, kv_cache_specs, [host_bytes] * len(available_memory))
    out = []
    for config, hbm_available in zip(configs, available_memory):
        groups = config.kv_cache_groups
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
            raise SparseServeConfigError(
                "sparseserve: offload=true supports models whose layers all use full attention with one KV cache "
                f"group; this model has {len(groups)} groups ({[type(g.kv_cache_spec).__name__ for g in groups]})"
            )
        page_bytes = groups[0].kv_cache_spec.page_size_bytes
        cache_blocks = int(cfg.hbm_cache_gib * GIB) // page_bytes
        if cache_blocks * page_bytes > hbm_available:
            raise SparseServeConfigError(
                f"sparseserve: hbm_cache_gib={cfg.hbm_cache_gib} exceeds the {hbm_available / GIB:.2f} GiB vLLM "
                f"found free for KV; allowed: <= {hbm_available / GIB:.2f} (or raise gpu_memory_utilization)"
            )
        if cache_blocks < 1:
            raise SparseServeConfigError(
                f"sparseserve: hbm_cache_gib={cfg.hbm_cache_gib} holds no KV block ({page_bytes} bytes each)"
            )
        spec = groups[0].kv_cache_spec
        pages_per_block = spec.num_kv_heads * (spec.block_size // cfg.page_size)
        chunk = vllm_config.scheduler_config.max_num_batched_tokens
        need_pages = spec.num_kv_heads * (cfg.num_select_pages + -(-chunk // cfg.page_size) + 1)
        if cache_blocks * pages_per_block < need_pages:
            need_gib = math.ceil(-(-need_pages // pages_per_block) * page_bytes / GIB * 1e6) / 1e6  # whole blocks
            raise SparseServeConfigError(
                f"sparseserve: hbm_cache_gib={cfg.hbm_cache_gib} holds {cache_blocks * pages_per_block} pages, fewer "
                f"than one layer of one step needs ({need_pages}: a decode's token_budget plus a "
                f"{chunk}-token prefill chunk); allowed: >= {need_gib:.6f}"
            )
        tensors = [KVCacheTensor(size=cache_blocks * page_bytes, shared_by=list(groups[0].layer_names))]
        out.append(KVCacheConfig(num_blocks=config.num_blocks, kv_cache_tensors=tensors, kv_cache_groups=groups))
    return out


def apply() -> None:
    if getattr(engine_core.get_kv_cache_configs, "__sparseserve_patched__", False):
        return

    @functools.wraps(_ORIGINAL)
    def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
        if selected(vllm_config) and sparseserve_config(vllm_config).offload:
            return offload_configs(vllm_config, kv_cache_specs, available_memory)
        return _ORIGINAL(vllm_config, kv_cache_specs, available_memory)

    get_kv_cache_configs.__sparseserve_patched__ = True
    engine_core.get_kv_cache_configs = get_kv_cache_configs
