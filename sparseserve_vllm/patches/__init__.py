"""Patches of vLLM 0.26 symbols, one file per target, and their ledger.

Ledger (target / why / how / remove when):

1. `vllm.engine.arg_utils.EngineArgs.create_engine_config` -- `engine_args.py`
   Why: vLLM has no hook that validates a plugin's `additional_config` in the process that parses the user's
        arguments; without one, a bad `sparseserve` setting would surface only as "engine core failed to start"
        from a spawned process. vLLM 0.26 also gives attention backends no config of their own (vllm#40051).
   How: wraps the method; before it, configures offload's KV connector and working-set scheduler and turns prefix
        caching off; after it
        builds the `VllmConfig`, parses `additional_config['sparseserve']` into
        `SparseServeConfig` (raising its clear `ValueError`) when the SparseServe backend is selected or the key
        is present, and checks the resolved block size.
   Remove when: vLLM offers per-backend configuration or a plugin config-validation hook.

2. `vllm.v1.engine.core.get_kv_cache_configs` -- `kv_cache_configs.py`
   Why: with `offload`, the scheduler must allocate blocks from the host-DRAM capacity while workers allocate only
        the HBM page cache; vLLM derives both from one number and has no hook between them.
   How: wraps the name imported into `vllm.v1.engine.core`; sizes the configs from `host_kv_gib` and replaces the
        per-layer tensors with one `hbm_cache_gib` tensor shared by all layers (the page pool).
   Remove when: vLLM lets a KV connector or backend declare a logical block space larger than HBM.

3. `vllm.model_executor.model_loader.base_loader.BaseModelLoader.load_model` -- `model_loader.py`
   Why: layer-segmented prefill calls the model's decoder layers one by one from the KV connector, and no vLLM
        hook hands a connector or an attention backend the loaded model.
   How: wraps the method; when layer-segmented prefill is on, stores the engine's model in the worker's runtime.
   Remove when: vLLM gives KV connectors (or plugins) the model, or runs layer-segmented prefill itself.

`apply_all()` is idempotent; each patch keeps a reference to the original callable.
"""

from __future__ import annotations

_applied = False


def apply_all() -> None:
    global _applied
    if _applied:
        return
    from sparseserve_vllm.patches import engine_args, kv_cache_configs, model_loader

    engine_args.apply()
    kv_cache_configs.apply()
    model_loader.apply()
    _applied = True
