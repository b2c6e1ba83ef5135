"""vLLM-free bookkeeping of SparseServe: the HBM page cache (`PageCache`), the working-set estimate
(`WorkingSetTracker` and sizing helpers), working-set-aware admission (`WorkingSetController`) and host reads of
device counters one step late (`LaggedRead`).

Imports only torch; nothing here moves KV data or knows about vLLM.
"""

from sparseserve_vllm.core.admission import AdmissionDecision, WorkingSetController
from sparseserve_vllm.core.lagged_read import LaggedRead
from sparseserve_vllm.core.page_cache import CacheCapacityError, PageCache
from sparseserve_vllm.core.working_set import (
    NEVER,
    WorkingSetTracker,
    decode_budget_pages,
    page_bytes,
    prefill_pages,
)

__all__ = [
    "NEVER",
    "AdmissionDecision",
    "CacheCapacityError",
    "LaggedRead",
    "PageCache",
    "WorkingSetController",
    "WorkingSetTracker",
    "decode_budget_pages",
    "page_bytes",
    "prefill_pages",
]
