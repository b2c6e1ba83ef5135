"""Reading `SparseServeConfig` out of a vLLM `VllmConfig`, and checking it against vLLM's own settings.

- `selected(vllm_config)`: is the SparseServe backend (the CUSTOM slot) the selected attention backend.
- `sparseserve_config(vllm_config)`: the parsed, validated `SparseServeConfig` (defaults when the key is absent).
- `validate_vllm_config(vllm_config)`: raises `SparseServeConfigError` for any invalid setting or combination.
"""

from __future__ import annotations

from vllm.v1.attention.backends.registry import AttentionBackendEnum

from sparseserve_vllm.config import CONFIG_KEY, SparseServeConfig, SparseServeConfigError


def selected(vllm_config) -> bool:
    return vllm_config.attention_config.backend == AttentionBackendEnum.CUSTOM


def sparseserve_config(vllm_config) -> SparseServeConfig:
    additional = vllm_config.additional_config
    return SparseServeConfig.from_additional_config(additional if isinstance(additional, dict) else {})


def validate_vllm_config(vllm_config) -> None:
    additional = vllm_config.additional_config
    has_key = isinstance(additional, dict) and CONFIG_KEY in additional
    if not (selected(vllm_config) or has_key):
        return
    cfg = sparseserve_config(vllm_config)
    if has_key and not selected(vllm_config):
        raise SparseServeConfigError(
            f"additional_config['{CONFIG_KEY}'] is set but the attention backend is "
            f"{vllm_config.attention_config.backend}; select it with --attention-backend sparseserve "
            f"(LLM(attention_backend='sparseserve')) or remove the '{CONFIG_KEY}' settings"
        )
    cache = vllm_config.cache_config
    cfg.validate_against(
        block_size=cache.block_size if cache.user_specified_block_size else None,
        num_layers=vllm_config.model_config.get_num_layers(vllm_config.parallel_config),
    )
    if cfg.offload and vllm_config.parallel_config.world_size > 1:
        raise SparseServeConfigError(
            "sparseserve: offload=true runs on one GPU (tensor/pipeline parallel size 1) in this release"
        )
