"""SparseServe for vLLM: dynamic sparse decode attention with a hierarchical HBM/DRAM KV cache.

Contract of this module: `register()` is the one `vllm.general_plugins` entry point. vLLM calls it in every
process (CLI/API server, engine core, workers); it is idempotent, imports nothing heavy at module import time,
refuses any vLLM other than 0.26.x with `UnsupportedVLLMVersion`, and then:
- registers `sparseserve_vllm.adapter.backend.SparseServeBackend` in vLLM's `AttentionBackendEnum.CUSTOM` slot
  and makes `sparseserve` a user-facing name of that slot, so `--attention-backend sparseserve` and
  `LLM(attention_backend="sparseserve")` select it;
- applies the patches listed in `sparseserve_vllm.patches` (each with its ledger entry);
- sets up the statistics folder and the `sparseserve_*` Prometheus collector (`adapter/metrics.py`).
"""

from sparseserve_vllm.version_check import SUPPORTED_VLLM, UnsupportedVLLMVersion, check_vllm_version

__version__ = "0.1.0"
__all__ = ["register", "check_vllm_version", "UnsupportedVLLMVersion", "SUPPORTED_VLLM", "__version__"]

BACKEND_NAME = "SPARSESERVE"
BACKEND_PATH = "sparseserve_vllm.adapter.backend.SparseServeBackend"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    # A user-facing alias of the CUSTOM member: it pickles as CUSTOM (value None), so spawned engine processes
    # unpickle it before plugins load (a brand-new member would not unpickle there).
    AttentionBackendEnum._member_map_.setdefault(BACKEND_NAME, AttentionBackendEnum.CUSTOM)

    from sparseserve_vllm.patches import apply_all
    from sparseserve_vllm.stats import ensure_stats_dir

    ensure_stats_dir()  # before vLLM spawns its engine and workers, so they inherit the folder
    from sparseserve_vllm.adapter.metrics import register_collector

    register_collector()

    apply_all()
    _registered = True
