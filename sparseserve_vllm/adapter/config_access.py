"""Reading `SparseServeConfig` out of a vLLM `VllmConfig`, and checking it against vLLM's own settings.

- `selected(vllm_config)`: is the SparseServe backend (the CUSTOM slot) the selected attention backend.
- `sparseserve_config(vllm_config)`: the parsed, validated `SparseServeConfig` (defaults when the key is absent).
- `segmented_prefill_on(vllm_config)`: does layer-segmented prefill run (SparseServe selected, offload on,
  `layer_segmented_prefill` not false, and a model architecture it supports).
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


def check_model(model_config) -> None:
    """The backend serves plain causal GQA/MHA decoder attention; refuse anything else before an engine starts."""
    text = model_config.hf_text_config
    unsupported = {
        "multi-head latent attention (MLA)": model_config.use_mla,
        f"sliding-window attention ({model_config.get_sliding_window()} tokens)": model_config.get_sliding_window(),
        "attention logit soft-capping": getattr(text, "attn_logit_softcapping", None),
        "an attention-free or hybrid (state-space) architecture": model_config.is_hybrid
        or model_config.is_attention_free,
    }
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise SparseServeConfigError(
            f"sparseserve: the model {model_config.model} uses {', '.join(used)}, which the sparseserve attention "
            f"backend does not support; allowed: decoder models with full causal attention (Llama, Qwen2, Mistral "
            f"without sliding window, Gemma); use another --attention-backend for this model"
        )


def _segmented_architecture(model_config) -> bool:
    from sparseserve_vllm.adapter.segmented_prefill import SEGMENTED_ARCHITECTURES

    return any(a in SEGMENTED_ARCHITECTURES for a in (model_config.architectures or ()))


def segmented_prefill_on(vllm_config) -> bool:
    if not selected(vllm_config):
        return False
    cfg = sparseserve_config(vllm_config)
    return cfg.offload and cfg.layer_segmented_prefill is not False and _segmented_architecture(vllm_config.model_config)


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
    check_model(vllm_config.model_config)
    cache = vllm_config.cache_config
    cfg.validate_against(
        block_size=cache.block_size if cache.user_specified_block_size else None,
        num_layers=vllm_config.model_config.get_num_layers(vllm_config.parallel_config),
    )
    from sparseserve_vllm.kernels.page_topk import MAX_SELECT_PAGES

    max_len = vllm_config.model_config.max_model_len
    if max_len > MAX_SELECT_PAGES * cfg.page_size:
        raise SparseServeConfigError(
            f"sparseserve: max_model_len={max_len} is more than {MAX_SELECT_PAGES} pages of page_size={cfg.page_size} "
            f"tokens; allowed: max_model_len <= {MAX_SELECT_PAGES * cfg.page_size} (raise page_size or lower "
            f"max_model_len)"
        )
    if cfg.offload:
        from sparseserve_vllm.core.host_kv import PINNABLE_FRACTION, max_pinnable_bytes

        limit = max_pinnable_bytes()
        if cfg.host_kv_gib * 2**30 > limit:
            raise SparseServeConfigError(
                f"sparseserve: host_kv_gib={cfg.host_kv_gib} is more than this host can pin; allowed: <= "
                f"{limit / 2**30:.1f} ({PINNABLE_FRACTION:.0%} of the memory available now)"
            )
    if cfg.layer_segmented_prefill and not _segmented_architecture(vllm_config.model_config):
        from sparseserve_vllm.adapter.segmented_prefill import SEGMENTED_ARCHITECTURES

        raise SparseServeConfigError(
            f"sparseserve: layer_segmented_prefill supports the architectures {', '.join(SEGMENTED_ARCHITECTURES)}; "
            f"this model is {', '.join(vllm_config.model_config.architectures or ['unknown'])}; set "
            f"layer_segmented_prefill to false or null"
        )
    if cfg.offload and vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise SparseServeConfigError(
            "sparseserve: offload=true does not support pipeline parallelism (pipeline_parallel_size "
            f"{vllm_config.parallel_config.pipeline_parallel_size}); allowed: 1 (tensor parallelism is supported)"
        )
