"""`SparseServeCpuPlatform`: vLLM's `CpuPlatform`, except that a selected CUSTOM backend (SparseServe) is honoured.

Every other selection (including the default) still gets CPU_ATTN, exactly as with `CpuPlatform`.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum


class SparseServeCpuPlatform(CpuPlatform):
    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if selected_backend == AttentionBackendEnum.CUSTOM:
            return selected_backend.get_path()
        return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
