"""FlashH2D: gather KV pages from pinned host DRAM into HBM cache slots in ONE Triton kernel launch (UVA).

Contract:
- `src_pages`: the flat page view of one host layer, `(num_pages, page_size, 2D)`, C-contiguous, on the CPU and
  pinned (`HostKVStore.pages(layer, page_size)`); a tensor on the destination's GPU is accepted too.
  `dst_pages`: a C-contiguous device tensor `(num_slots, page_size, 2D)` of the same page shape and dtype (the
  HBM cache's flat page view). `src_ids`, `dst_ids`: 1-D int32/int64 tensors of one length N.
- Effect: `dst_pages[dst_ids[i]] = src_pages[src_ids[i]]` for every i with `src_ids[i] >= 0 and dst_ids[i] >= 0`;
  pairs with a negative id are skipped (padding, so a fixed-size id buffer works under CUDA graphs). Sources
  may repeat; destinations must not (if one does, which source lands there is unspecified). Nothing else in
  `dst_pages` is touched. Bytes are copied as they are (no dtype conversion).
- Mechanism: the GPU reads host memory directly through unified virtual addressing: the host tensor's
  `data_ptr()` is passed as an int64 and cast to a pointer inside the kernel (a pinned allocation has the same
  address on host and device). The kernel copies raw words (8 bytes when page size and both base addresses
  allow, so each thread issues 16-byte vector loads of two words). Work is cut into tiles of `tile_bytes`
  (32 KiB by default): several whole pages per tile for small pages, one chunk of a page for pages larger than
  a tile, so a large page is split across programs. A persistent grid of at most `num_sms` programs (default:
  the GPU's SM count) loops over the tiles; `num_sms` bounds how many SMs the copy can take from compute.
- `FlashH2D` follows the FlashInfer style: `plan(src_pages, dst_pages)` validates and fixes the tile geometry
  on the host once per (host pool, HBM cache) pair; `run(src_ids, dst_ids)` launches the kernel on the current
  CUDA stream without host synchronization or allocation (CUDA-graph capturable for a fixed N).
  `flash_h2d(...)` is the one-call form.
- Validation: shapes, dtypes, contiguity, devices and pinning in `plan`; id tensors' rank, length, dtype and
  device in `run`; id ranges only where that is cheap (ids on the CPU; checking device ids would synchronize).
  Bad arguments raise `ValueError` naming the argument.
- Under `TRITON_INTERPRET=1` (read when this module is imported) the same kernel runs on the CPU with CPU
  tensors on both sides (pointers are host pointers there). Without it a CPU destination is served by the
  pure-torch path `flash_h2d_torch` (index_select + index_copy_), which is also the reference semantics.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .uva_launch import UvaCopy, host_pointer, next_pow2

__all__ = ["FlashH2D", "flash_h2d", "flash_h2d_torch"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_WORD_DTYPES = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.int8))


@triton.jit
def _flash_h2d_kernel(
    src_addr,  # int64: address of the source page pool (pinned host memory through UVA)
    dst_ptr,  # pointer to the destination page pool, viewed as words
    src_ids_ptr,
    dst_ids_ptr,
    num_pairs,
    WORDS_PER_PAGE: tl.constexpr,
    CHUNK_WORDS: tl.constexpr,  # words of one page a tile covers (a power of two)
    CHUNKS_PER_PAGE: tl.constexpr,
    PAGES_PER_TILE: tl.constexpr,  # > 1 only when CHUNKS_PER_PAGE == 1
    EVEN: tl.constexpr,  # CHUNK_WORDS * CHUNKS_PER_PAGE == WORDS_PER_PAGE
    SRC_ALIGNED: tl.constexpr,  # src_addr % 16 == 0
):
    src_ptr = host_pointer(src_addr, dst_ptr, SRC_ALIGNED)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(num_pairs, PAGES_PER_TILE) * CHUNKS_PER_PAGE
    pages = tl.arange(0, PAGES_PER_TILE)
    words = tl.arange(0, CHUNK_WORDS)
    for tile in range(pid, num_tiles, num_programs):
        group = tile // CHUNKS_PER_PAGE
        chunk = tile % CHUNKS_PER_PAGE
        pair = group * PAGES_PER_TILE + pages
        in_range = pair < num_pairs
        src_id = tl.load(src_ids_ptr + pair, mask=in_range, other=-1).to(tl.int64)
        dst_id = tl.load(dst_ids_ptr + pair, mask=in_range, other=-1).to(tl.int64)
        valid = (src_id >= 0) & (dst_id >= 0)
        word = chunk * CHUNK_WORDS + words
        mask = valid[:, None]
        if not EVEN:
            mask = mask & (word < WORDS_PER_PAGE)[None, :]
        src = src_ptr + src_id[:, None] * WORDS_PER_PAGE + word[None, :]
        dst = dst_ptr + dst_id[:, None] * WORDS_PER_PAGE + word[None, :]
        tl.store(dst, tl.load(src, mask=mask), mask=mask)


def _check_pages(name: str, pages: object) -> torch.Tensor:
    if not isinstance(pages, torch.Tensor) or pages.dim() != 3:
        got = tuple(pages.shape) if isinstance(pages, torch.Tensor) else type(pages).__name__
        raise ValueError(f"{name} must be a 3-D tensor (num_pages, page_size, 2*D), got {got}")
    if not pages.is_contiguous():
        raise ValueError(f"{name} must be C-contiguous (a flat page view of an HND cache)")
    return pages


class FlashH2D(UvaCopy):
    """One-launch page gather host -> device (see the module docstring). Reusable: `plan` once, `run` many."""

    def __init__(self, *, num_sms: int | None = None, tile_bytes: int = 32768, num_warps: int = 8):
        super().__init__(num_sms=num_sms, tile_bytes=tile_bytes, num_warps=num_warps)

    def plan(self, src_pages: torch.Tensor, dst_pages: torch.Tensor) -> "FlashH2D":
        """Validate the two page pools and fix word size, tile geometry and the grid bound. Returns self."""
        src_pages = _check_pages("src_pages", src_pages)
        dst_pages = _check_pages("dst_pages", dst_pages)
        if src_pages.shape[1:] != dst_pages.shape[1:]:
            raise ValueError(
                f"dst_pages page shape {tuple(dst_pages.shape[1:])} must equal src_pages page shape {tuple(src_pages.shape[1:])}"
            )
        if src_pages.dtype != dst_pages.dtype:
            raise ValueError(f"dst_pages dtype {dst_pages.dtype} must equal src_pages dtype {src_pages.dtype}")
        device = dst_pages.device
        if device.type == "cuda":
            if src_pages.device.type == "cpu":
                if not src_pages.is_pinned():
                    raise ValueError("src_pages must be pinned host memory (pin_memory=True) for a GPU destination")
            elif src_pages.device != device:
                raise ValueError(f"src_pages must be pinned host memory or on {device}, got {src_pages.device}")
        elif device.type == "cpu":
            if not _INTERPRET:
                raise ValueError("dst_pages on the CPU needs TRITON_INTERPRET=1 for the kernel; use flash_h2d_torch")
            if src_pages.device.type != "cpu":
                raise ValueError(f"src_pages must be on the CPU under the interpreter, got {src_pages.device}")
        else:
            raise ValueError(f"dst_pages must be on a CUDA device (or the CPU under TRITON_INTERPRET=1), got {device}")

        page_bytes = src_pages.shape[1] * src_pages.shape[2] * src_pages.element_size()
        for word_bytes, word_dtype in _WORD_DTYPES:
            if (page_bytes % word_bytes == 0 and src_pages.data_ptr() % word_bytes == 0
                    and dst_pages.data_ptr() % word_bytes == 0):
                break
        words_per_page = page_bytes // word_bytes
        tile_words = max(1, self.tile_bytes // word_bytes)
        chunk_words = min(tile_words, next_pow2(words_per_page))
        chunks_per_page = triton.cdiv(words_per_page, chunk_words)
        if chunks_per_page > 1:
            # Prefer a chunk that divides the page (no tail mask) unless that makes chunks tiny.
            divisor = words_per_page & -words_per_page
            if words_per_page % chunk_words and divisor >= min(chunk_words, 256):
                chunk_words = divisor
                chunks_per_page = words_per_page // chunk_words
        self._src_addr = src_pages.data_ptr()
        self._src_pages = src_pages  # keeps the host pool alive while planned
        self._num_src = src_pages.shape[0]
        self._dst_words = dst_pages.view(-1).view(word_dtype)
        self._num_dst = dst_pages.shape[0]
        self._device = device
        self._constexprs = dict(
            WORDS_PER_PAGE=words_per_page,
            CHUNK_WORDS=chunk_words,
            CHUNKS_PER_PAGE=chunks_per_page,
            PAGES_PER_TILE=max(1, tile_words // chunk_words) if chunks_per_page == 1 else 1,
            EVEN=chunks_per_page * chunk_words == words_per_page,
            SRC_ALIGNED=src_pages.data_ptr() % 16 == 0,
        )
        self._finish_plan(self._dst_words.element_size(), device)
        return self

    def run(self, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
        """Launch the gather for the pairs (src_ids[i], dst_ids[i]); asynchronous on the current stream."""
        self._require_plan("src_pages, dst_pages")
        for name, ids in (("src_ids", src_ids), ("dst_ids", dst_ids)):
            if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{name} must be a 1-D int32 or int64 tensor")
            if ids.device != self._device:
                raise ValueError(f"{name} must be on the destination's device {self._device}, got {ids.device}")
            if not ids.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
        if src_ids.numel() != dst_ids.numel():
            raise ValueError(f"src_ids and dst_ids must have one length, got {src_ids.numel()} and {dst_ids.numel()}")
        if src_ids.device.type == "cpu":
            _check_id_range("src_ids", src_ids, self._num_src)
            _check_id_range("dst_ids", dst_ids, self._num_dst)
        n = src_ids.numel()
        if n == 0:
            return
        c = self._constexprs
        num_tiles = triton.cdiv(n, c["PAGES_PER_TILE"]) * c["CHUNKS_PER_PAGE"]
        grid = (min(self._max_programs, num_tiles),)
        if self._device.type == "cuda":
            with torch.cuda.device(self._device):  # Triton launches on the current device
                _flash_h2d_kernel[grid](self._src_addr, self._dst_words, src_ids, dst_ids, n, **c, num_warps=self.num_warps)
        else:
            _flash_h2d_kernel[grid](self._src_addr, self._dst_words, src_ids, dst_ids, n, **c, num_warps=self.num_warps)


def _check_id_range(name: str, ids: torch.Tensor, limit: int) -> None:
    if ids.numel() and int(ids.max()) >= limit:
        raise ValueError(f"{name} must be < {limit} (negative = skip), got max {int(ids.max())}")


def flash_h2d_torch(src_pages: torch.Tensor, dst_pages: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> torch.Tensor:
    """Reference semantics of FlashH2D with index_select + index_copy_ (any devices; synchronizes). Returns dst_pages."""
    src_pages = _check_pages("src_pages", src_pages)
    dst_pages = _check_pages("dst_pages", dst_pages)
    if src_pages.shape[1:] != dst_pages.shape[1:] or src_pages.dtype != dst_pages.dtype:
        raise ValueError("dst_pages must have src_pages' page shape and dtype")
    for name, ids in (("src_ids", src_ids), ("dst_ids", dst_ids)):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a 1-D int32 or int64 tensor")
    if src_ids.numel() != dst_ids.numel():
        raise ValueError(f"src_ids and dst_ids must have one length, got {src_ids.numel()} and {dst_ids.numel()}")
    src_ids = src_ids.to(src_pages.device, torch.int64)
    dst_ids = dst_ids.to(dst_pages.device, torch.int64)
    _check_id_range("src_ids", src_ids, src_pages.shape[0])
    _check_id_range("dst_ids", dst_ids, dst_pages.shape[0])
    keep = (src_ids >= 0) & (dst_ids.to(src_ids.device) >= 0)
    src_ids = src_ids[keep]
    dst_ids = dst_ids[keep.to(dst_ids.device)]
    dst_pages.index_copy_(0, dst_ids, src_pages.index_select(0, src_ids).to(dst_pages.device))
    return dst_pages


def flash_h2d(
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    *,
    num_sms: int | None = None,
) -> torch.Tensor:
    """One-call FlashH2D: `dst_pages[dst_ids[i]] = src_pages[src_ids[i]]`. Returns dst_pages.

    The Triton kernel serves a CUDA destination (and a CPU one under TRITON_INTERPRET=1); otherwise the torch path.
    Id tensors on the CPU are range-checked and moved to the destination's device.
    """
    if isinstance(dst_pages, torch.Tensor) and dst_pages.device.type == "cpu" and not _INTERPRET:
        return flash_h2d_torch(src_pages, dst_pages, src_ids, dst_ids)
    op = FlashH2D(num_sms=num_sms).plan(src_pages, dst_pages)
    ids = []
    for name, t, limit in (("src_ids", src_ids, op._num_src), ("dst_ids", dst_ids, op._num_dst)):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() == 1:
            _check_id_range(name, t, limit)
            t = t.to(dst_pages.device, non_blocking=True)
        ids.append(t.contiguous() if isinstance(t, torch.Tensor) else t)
    op.run(*ids)
    return dst_pages
