"""Sparse decode attention kernels (Triton on CUDA, pure torch on CPU) over per-KV-head KV pages.

Public API (submodules are imported lazily, so ``TRITON_INTERPRET`` may be set before first use):
  * ``score_pages`` / ``score_pages_torch``                        (page_scores.py)
  * ``select_pages`` / ``select_pages_torch``                      (page_topk.py)
  * ``sparse_decode_attention`` / ``sparse_decode_attention_torch``, ``choose_num_splits``,
    ``alloc_split_workspace``                                      (sparse_decode.py)
  * ``build_page_metadata`` / ``build_page_metadata_torch``        (page_metadata.py)
  * ``pages_to_slots``, ``flat_page_view``, ``num_meta_vectors``, ``SELECTOR_NUM_VECTORS``   (pages.py)
  * ``SparseDecodeWrapper``                                        (decode_plan.py)
This package imports only torch, triton and the standard library (never vLLM).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "score_pages": "page_scores",
    "score_pages_torch": "page_scores",
    "select_pages": "page_topk",
    "select_pages_torch": "page_topk",
    "sparse_decode_attention": "sparse_decode",
    "sparse_decode_attention_torch": "sparse_decode",
    "choose_num_splits": "sparse_decode",
    "alloc_split_workspace": "sparse_decode",
    "build_page_metadata": "page_metadata",
    "build_page_metadata_torch": "page_metadata",
    "pages_to_slots": "pages",
    "flat_page_view": "pages",
    "num_meta_vectors": "pages",
    "SELECTOR_NUM_VECTORS": "pages",
    "SparseDecodeWrapper": "decode_plan",
    "FlashD2HScatter": "flash_d2h_scatter",
    "flash_d2h_scatter_torch": "flash_d2h_scatter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
