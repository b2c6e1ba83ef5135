"""Patch: `BaseModelLoader.load_model` (see the ledger in `__init__`).

After the original returns, when the SparseServe backend runs layer-segmented prefill, the loaded model is handed
to the worker's `SparseRuntime` (`runtime.model`), whose `SegmentedPrefill` calls its decoder layers one by one.
Only the engine's own model is kept (not a draft model's): the one loaded for `vllm_config.model_config`.
"""

from __future__ import annotations

import functools

from vllm.model_executor.model_loader.base_loader import BaseModelLoader

_ORIGINAL = BaseModelLoader.load_model


def apply() -> None:
    if getattr(BaseModelLoader.load_model, "__sparseserve_patched__", False):
        return

    @functools.wraps(_ORIGINAL)
    def load_model(self, vllm_config, model_config, *args, **kwargs):
        model = _ORIGINAL(self, vllm_config, model_config, *args, **kwargs)
        from sparseserve_vllm.adapter.config_access import segmented_prefill_on

        if model_config is vllm_config.model_config and segmented_prefill_on(vllm_config):
            from sparseserve_vllm.adapter.runtime import get_runtime

            get_runtime(vllm_config).model = model
        return model

    load_model.__sparseserve_patched__ = True
    BaseModelLoader.load_model = load_model
