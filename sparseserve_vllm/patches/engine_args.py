"""Patch: `EngineArgs.create_engine_config` (see the ledger in `__init__`).

Before the original runs: when `offload` is on, configure what offload needs from vLLM itself -- the SparseServe KV
connector (the scheduler-to-worker channel), the working-set-aware scheduler (`adapter/scheduler.py`) and no
prefix caching (vLLM copies cached blocks by block id in HBM, which offload's logical block ids do not address);
each change is logged, and a conflicting explicit user setting is an error. After it returns:
`validate_vllm_config` checks every `sparseserve` setting in the user's own process, so `vllm serve` and `LLM(...)`
stop with the `SparseServeConfigError` itself.
"""

from __future__ import annotations

import functools

from vllm.engine.arg_utils import EngineArgs
from sparseserve_vllm.adapter.logging import logger as plugin_logger

from sparseserve_vllm.adapter.config_access import validate_vllm_config
from sparseserve_vllm.config import CONFIG_KEY, SparseServeConfig, SparseServeConfigError

logger = plugin_logger(__name__)
_ORIGINAL = EngineArgs.create_engine_config

CONNECTOR = {
    "kv_connector": "SparseServeConnector",
    "kv_connector_module_path": "sparseserve_vllm.adapter.connector",
    "kv_role": "kv_both",
}
SCHEDULER = "sparseserve_vllm.adapter.scheduler.WorkingSetScheduler"


def prepare_offload(args: EngineArgs) -> None:
    additional = args.additional_config if isinstance(args.additional_config, dict) else {}
    if CONFIG_KEY not in additional or not SparseServeConfig.from_additional_config(additional).offload:
        return
    from vllm.config import KVTransferConfig

    if args.kv_transfer_config is not None and args.kv_transfer_config.kv_connector != CONNECTOR["kv_connector"]:
        raise SparseServeConfigError(
            f"sparseserve: offload=true uses its own KV connector, but --kv-transfer-config selects "
            f"{args.kv_transfer_config.kv_connector}; remove --kv-transfer-config or set offload to false"
        )
    if getattr(args, "kv_offloading_size", None):
        raise SparseServeConfigError(
            "sparseserve: offload=true replaces vLLM's --kv-offloading-size; use one of the two"
        )
    if args.scheduler_cls not in (None, SCHEDULER):
        from sparseserve_vllm.adapter.scheduler import WorkingSetScheduler

        if not (isinstance(args.scheduler_cls, type) and issubclass(args.scheduler_cls, WorkingSetScheduler)):
            raise SparseServeConfigError(
                f"sparseserve: offload=true uses its working-set-aware scheduler ({SCHEDULER}), but --scheduler-cls "
                f"selects {args.scheduler_cls}; remove --scheduler-cls or set offload to false"
            )
    args.kv_transfer_config = KVTransferConfig(**CONNECTOR)
    if args.scheduler_cls is None:
        logger.info("SparseServe offload: working-set-aware batch control (--scheduler-cls %s)", SCHEDULER)
        args.scheduler_cls = SCHEDULER
    if args.enable_prefix_caching:
        raise SparseServeConfigError(
            "sparseserve: offload=true does not support prefix caching yet; remove --enable-prefix-caching"
        )
    if args.enable_prefix_caching is None:
        logger.info("SparseServe offload: prefix caching is turned off (not supported with offload yet)")
    args.enable_prefix_caching = False


def apply() -> None:
    if getattr(EngineArgs.create_engine_config, "__sparseserve_patched__", False):
        return

    @functools.wraps(_ORIGINAL)
    def create_engine_config(self, *args, **kwargs):
        prepare_offload(self)
        vllm_config = _ORIGINAL(self, *args, **kwargs)
        validate_vllm_config(vllm_config)
        return vllm_config

    create_engine_config.__sparseserve_patched__ = True
    EngineArgs.create_engine_config = create_engine_config
