"""`vllm.platform_plugins` entry point: on CPU machines, vLLM's CPU platform that honours the CUSTOM backend slot.

vLLM 0.26's `CpuPlatform.get_attn_backend_cls` always returns CPU_ATTN, whatever the user selected.
`cpu_platform_plugin()` activates exactly where vLLM's built-in CPU platform would (and on vLLM 0.26.x only),
and names `sparseserve_vllm.adapter.cpu_platform.SparseServeCpuPlatform`, which differs from `CpuPlatform`
only in returning the registered CUSTOM backend (SparseServe) when that is selected. So a CPU user selects
`--attention-backend sparseserve` and nothing else. On GPUs it never activates. This module imports nothing
from vLLM at import time: vLLM calls it while it is still resolving its platform.
"""

from __future__ import annotations


def cpu_platform_plugin() -> str | None:
    import vllm
    from vllm.platforms import cpu_platform_plugin as builtin_cpu

    from sparseserve_vllm.version_check import SUPPORTED_VLLM

    if not vllm.__version__.startswith(SUPPORTED_VLLM + "."):
        return None  # the general plugin raises the version error with its full message
    return "sparseserve_vllm.adapter.cpu_platform.SparseServeCpuPlatform" if builtin_cpu() else None
