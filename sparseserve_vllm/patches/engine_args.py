"""Patch: validate the `sparseserve` settings when vLLM builds its config (see the ledger in `__init__`).

After the original `EngineArgs.create_engine_config` returns, `validate_vllm_config` runs in the user's own
process, so `vllm serve` and `LLM(...)` stop with the `SparseServeConfigError` itself.
"""

from __future__ import annotations

import functools

from vllm.engine.arg_utils import EngineArgs

from sparseserve_vllm.adapter.config_access import validate_vllm_config

_ORIGINAL = EngineArgs.create_engine_config


def apply() -> None:
    if getattr(EngineArgs.create_engine_config, "__sparseserve_patched__", False):
        return

    @functools.wraps(_ORIGINAL)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = _ORIGINAL(self, *args, **kwargs)
        validate_vllm_config(vllm_config)
        return vllm_config

    create_engine_config.__sparseserve_patched__ = True
    EngineArgs.create_engine_config = create_engine_config
