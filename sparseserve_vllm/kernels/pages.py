"""Page addressing helpers shared by the sparse-decode kernels (pure torch).

Layout (see docs/helper-brief.md, "Shared data layout"):
  * per-layer KV cache ``kv`` of shape ``(num_blocks, Hkv, block_size, 2*D)``; ``K = kv[..., :D]``,
    ``V = kv[..., D:]``; a *page* is ``page_size`` tokens of one KV head; ``ppb = block_size // page_size``.
  * flat page view ``kv.view(num_blocks * Hkv * ppb, page_size, 2*D)``; the page (block b, head h,
    page-in-block j) has flat slot id ``(b * Hkv + h) * ppb + j``.
  * logical page ``p`` of request ``r`` lives in block ``block_table[r, p // ppb]``, page-in-block ``p % ppb``.
  * page metadata ``meta`` of shape ``(num_blocks * Hkv * ppb, M, D)`` indexed by flat slot id; ``M`` is given by
    ``SELECTOR_NUM_VECTORS[selector]``.

Public helpers:
  * ``SELECTOR_NUM_VECTORS`` / ``num_meta_vectors(selector)``: M for each selector.
  * ``flat_page_view(kv, page_size)``: the flat page view (a view, never a copy; raises if impossible).
  * ``pages_to_slots(page_idx, block_table, seq_lens, *, page_size, ppb, num_kv_heads, out=None)``:
    logical page indices ``[B, Hkv, K]`` (int, ``-1`` = padding) -> ``(slots, page_lens)``, both int32
    ``[B, Hkv, K]``: the flat slot id of each selected page (0 for padding, so it is always addressable) and
    its number of valid tokens ``clamp(seq_len - p * page_size, 0, page_size)`` (0 for padding).
    Only torch tensor ops: no host synchronisation.
  * ``resolve_backend(backend, tensor)``: ``"auto"`` picks ``"triton"`` for CUDA tensors, ``"torch"`` otherwise.
  * ``triton_interpreting()``: whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, which must be
    set before ``triton`` is first imported). Triton is imported by this module only inside these two functions.
"""

from __future__ import annotations

import torch

SELECTOR_NUM_VECTORS = {"quest": 2, "cuboid_mean": 2, "mean": 1}


def num_meta_vectors(selector: str) -> int:
    """Number of D-vectors ``M`` stored per page for ``selector``."""
    if selector not in SELECTOR_NUM_VECTORS:
        raise ValueError(
            f"selector must be one of {sorted(SELECTOR_NUM_VECTORS)}, got {selector!r}")
    return SELECTOR_NUM_VECTORS[selector]


def flat_page_view(kv: torch.Tensor, page_size: int) -> torch.Tensor:
    """View ``kv`` ``(num_blocks, Hkv, block_size, 2D)`` as pages ``(num_blocks*Hkv*ppb, page_size, 2D)``."""
    if kv.dim() != 4:
        raise ValueError(f"kv must be 4-D (num_blocks, Hkv, block_size, 2*D), got shape {tuple(kv.shape)}")
    num_blocks, hkv, block_size, two_d = kv.shape
    if page_size <= 0 or block_size % page_size != 0:
        raise ValueError(f"page_size must divide block_size={block_size}, got {page_size}")
    ppb = block_size // page_size
    try:
        return kv.view(num_blocks * hkv * ppb, page_size, two_d)
    except RuntimeError as exc:
        raise ValueError(f"kv with strides {kv.stride()} cannot be viewed as flat pages without a copy") from exc


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def pages_to_slots(
    page_idx: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    page_size: int,
    ppb: int,
    num_kv_heads: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map logical page indices to flat slot ids and valid lengths (see module docstring)."""
    _check_positive("page_size", page_size)
    _check_positive("ppb", ppb)
    _check_positive("num_kv_heads", num_kv_heads)
    if page_idx.dim() != 3 or page_idx.shape[1] != num_kv_heads:
        raise ValueError(f"page_idx must be [B, num_kv_heads={num_kv_heads}, K], got {tuple(page_idx.shape)}")
    bsz, hkv, k = page_idx.shape
    if block_table.dim() != 2 or block_table.shape[0] < bsz:
        raise ValueError(f"block_table must be [>= B={bsz}, max_blocks], got {tuple(block_table.shape)}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] < bsz:
        raise ValueError(f"seq_lens must be [>= B={bsz}], got {tuple(seq_lens.shape)}")
    if out is None:
        slots = torch.empty((bsz, hkv, k), dtype=torch.int32, device=page_idx.device)
        lens = torch.empty_like(slots)
    else:
        slots, lens = out
        for name, t in (("out[0] (slots)", slots), ("out[1] (page_lens)", lens)):
            if t.shape != page_idx.shape or t.dtype != torch.int32:
                raise ValueError(f"{name} must be int32 of shape {tuple(page_idx.shape)}, "
                                 f"got {t.dtype} {tuple(t.shape)}")

    pidx = page_idx.long()
    valid = pidx >= 0
    p = pidx.clamp(min=0)
    blk_col = (p // ppb).clamp(max=block_table.shape[1] - 1)
    blocks = torch.gather(block_table[:bsz].long(), 1, blk_col.view(bsz, hkv * k)).view(bsz, hkv, k)
    head = torch.arange(hkv, device=page_idx.device).view(1, hkv, 1)
    flat = (blocks * hkv + head) * ppb + p % ppb
    slots.copy_(torch.where(valid, flat, torch.zeros_like(flat)))
    n_valid = (seq_lens[:bsz].long().view(bsz, 1, 1) - p * page_size).clamp(0, page_size)
    lens.copy_(torch.where(valid, n_valid, torch.zeros_like(n_valid)))
    return slots, lens


BACKENDS = ("auto", "triton", "torch")


def triton_interpreting() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """``"auto"`` -> ``"triton"`` for CUDA tensors, ``"torch"`` otherwise; ``"triton"`` on a non-CUDA tensor needs
    the Triton interpreter (``TRITON_INTERPRET=1``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend == "triton" and not tensor.is_cuda and not triton_interpreting():
        raise ValueError(f"backend='triton' on {tensor.device} tensors needs TRITON_INTERPRET=1 "
                         "(the Triton interpreter); use backend='torch' or 'auto'")
    return backend
