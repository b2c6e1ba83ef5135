"""FlashD2H scatter: write packed KV rows from the GPU straight into the pinned host store, ONE Triton launch (UVA).

Contract:
- `host_kv`: the host store `(num_layers, num_blocks, Hkv, block_size, 2D)` (`HostKVStore.kv`), C-contiguous, on the
  CPU and pinned (`cudaHostRegister` or `pin_memory`). `src`: C-contiguous `[>= T, Hkv, 2D]` rows of the same dtype
  on the GPU (K then V per head, as FlashD2H packs them); rows past T are ignored. `slots`: 1-D int32/int64 `[T]`
  of LOGICAL slot ids `block * block_size + offset` (negative = skip). `layer`: an int, or a 1-D int32/int64 `[T]`
  tensor giving each row its own layer (one launch for the saves of several layers).
- Effect: `host_kv[layer_t, s // block_size, h, s % block_size, :] = src[t, h]` for every head h and every t with
  `0 <= s = slots[t] < num_blocks * block_size` (and `0 <= layer_t < num_layers`). Slot ids must be unique per
  layer within one launch (if one repeats, which row lands there is unspecified). Nothing else is written.
  Bytes are copied as they are. Rows with an out-of-range slot or layer are skipped and counted:
  `take_out_of_range()` returns the count of such tokens and resets it, in the order of the current stream (it
  synchronizes that stream: call it on the stream of the launches). `run(..., saved=c)` also adds the number of
  tokens it wrote to `c` (an int64 tensor of one element on the device), on the device: a caller's byte counter
  without ops of its own.
- Mechanism: the GPU stores into host memory through unified virtual addressing: `host_kv.data_ptr()` is passed as
  an int64 and cast to a pointer in the kernel (a pinned allocation has the same address on host and device). It
  copies raw words (8 bytes when the row size and the store's base address allow, so each thread issues 16-byte
  stores; `src` must start at a multiple of the word). A tile is up to `tile_bytes` (16 KiB) of one KV head:
  consecutive tokens' rows of that head, which for tokens of one block land in one contiguous host run (a prefill
  writes runs of `block_size * 2D` elements; a decode token writes one `2D` row per head). A persistent grid of at
  most `num_sms` programs (default: the GPU's SM count) loops over the tiles, so on a side stream the scatter takes
  a bounded share of the SMs from compute.
- FlashInfer style: `plan(host_kv, device)` validates the store and fixes word size, tile geometry and the grid
  bound (allocates the 8-byte out-of-range counter); `run(src, slots, layer)` launches on the current CUDA stream
  without host synchronization or allocation (CUDA-graph capturable for a fixed T).
- Validation: the store in `plan`; rank, shapes, dtypes, devices, contiguity and alignment in `run`. `run` never
  reads slot or layer values (that would synchronize): the kernel skips and counts out-of-range rows instead.
  Bad arguments raise `ValueError` naming the argument.
- Under `TRITON_INTERPRET=1` (read when this module is imported) the same kernel runs on the CPU with CPU tensors
  (pointers are host pointers there). `flash_d2h_scatter_torch` (index assignment) is the torch path for the CPU
  and the reference semantics; it raises for out-of-range slots instead of skipping them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .uva_launch import UvaCopy, host_pointer, next_pow2

__all__ = ["FlashD2HScatter", "flash_d2h_scatter_torch"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_WORD_DTYPES = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.int8))
_INT_DTYPES = (torch.int32, torch.int64)


# One compiled variant whatever the piece's length, layer or ring offset (no value or alignment specialization of
# those arguments: a new variant would compile, for a second or so, in the middle of serving). `src_ptr` keeps its
# alignment specialization (16-byte loads; every ring row is aligned when Hkv * 2D * itemsize % 16 == 0).
@triton.jit(do_not_specialize=["num_rows", "layer", "num_layers", "num_blocks"],
            do_not_specialize_on_alignment=["slots_ptr", "layers_ptr"])
def _flash_d2h_scatter_kernel(
    src_ptr,  # packed rows [T', Hkv, ROW_WORDS] on the device, viewed as words
    dst_addr,  # int64: address of host_kv (pinned host memory through UVA)
    slots_ptr,
    layers_ptr,  # per-row layers (PER_ROW_LAYER) or unused
    out_of_range_ptr,  # int64 [1]: tokens skipped for an out-of-range slot or layer
    saved_ptr,  # int64 [1]: tokens written, added to (COUNT_SAVED)
    num_rows,
    layer,  # the layer of every row (not PER_ROW_LAYER)
    num_layers,
    num_blocks,
    HKV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROW_WORDS: tl.constexpr,
    ROW_BLOCK: tl.constexpr,  # ROW_WORDS rounded up to a power of two
    TOKENS: tl.constexpr,  # tokens of one head per tile (a power of two)
    PER_ROW_LAYER: tl.constexpr,
    DST_ALIGNED: tl.constexpr,  # dst_addr % 16 == 0
    COUNT_SAVED: tl.constexpr,
):
    dst_ptr = host_pointer(dst_addr, src_ptr, DST_ALIGNED)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(num_rows, TOKENS) * HKV
    num_tokens = num_blocks * BLOCK_SIZE
    toks = tl.arange(0, TOKENS)
    words = tl.arange(0, ROW_BLOCK)
    for tile in range(pid, num_tiles, num_programs):
        head = tile % HKV
        t = (tile // HKV) * TOKENS + toks
        in_range = t < num_rows
        s = tl.load(slots_ptr + t, mask=in_range, other=-1).to(tl.int64)
        if PER_ROW_LAYER:
            lay = tl.load(layers_ptr + t, mask=in_range, other=0).to(tl.int64)
            bad = (s >= 0) & ((s >= num_tokens) | (lay < 0) | (lay >= num_layers))
        else:
            lay = layer.to(tl.int64)
            bad = s >= num_tokens
        num_bad = tl.sum(bad.to(tl.int64), axis=0)
        if (head == 0) & (num_bad > 0):  # count tokens, not (token, head) rows
            tl.atomic_add(out_of_range_ptr, num_bad)
        ok = (s >= 0) & ~bad
        if COUNT_SAVED:
            if head == 0:
                tl.atomic_add(saved_ptr, tl.sum(ok.to(tl.int64), axis=0))
        block = s // BLOCK_SIZE
        dst_row = ((lay * num_blocks + block) * HKV + head) * BLOCK_SIZE + (s - block * BLOCK_SIZE)
        src_row = t.to(tl.int64) * HKV + head
        mask = ok[:, None]
        if ROW_BLOCK != ROW_WORDS:
            mask = mask & (words < ROW_WORDS)[None, :]
        x = tl.load(src_ptr + src_row[:, None] * ROW_WORDS + words[None, :], mask=mask)
        tl.store(dst_ptr + dst_row[:, None] * ROW_WORDS + words[None, :], x, mask=mask)


def _check_store(host_kv: object) -> torch.Tensor:
    if not isinstance(host_kv, torch.Tensor) or host_kv.dim() != 5:
        got = tuple(host_kv.shape) if isinstance(host_kv, torch.Tensor) else type(host_kv).__name__
        raise ValueError(f"host_kv must be a 5-D tensor (num_layers, num_blocks, Hkv, block_size, 2D), got {got}")
    if not host_kv.is_contiguous():
        raise ValueError("host_kv must be C-contiguous (HostKVStore.kv)")
    if host_kv.device.type != "cpu":
        raise ValueError(f"host_kv must be in host memory, got {host_kv.device}")
    return host_kv


def _check_rows(src: object, slots: object, layer: object, host_kv: torch.Tensor, device: torch.device) -> int:
    """Validate shapes, dtypes and devices of one scatter's arguments; returns T."""
    if not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype not in _INT_DTYPES:
        raise ValueError("slots must be a 1-D int32 or int64 tensor")
    t = slots.numel()
    row_shape = tuple(host_kv.shape[2:3]) + tuple(host_kv.shape[4:])
    if not isinstance(src, torch.Tensor) or src.dim() != 3 or tuple(src.shape[1:]) != row_shape or src.shape[0] < t:
        got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
        raise ValueError(f"src must be [>= {t}, {row_shape[0]}, {row_shape[1]}] (T = len(slots)), got {got}")
    if src.dtype != host_kv.dtype:
        raise ValueError(f"src dtype must be host_kv's {host_kv.dtype}, got {src.dtype}")
    if isinstance(layer, torch.Tensor):
        if layer.dim() != 1 or layer.dtype not in _INT_DTYPES or layer.numel() != t:
            raise ValueError(f"layer must be an int or a 1-D int32/int64 tensor of len(slots) = {t}")
    elif not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < host_kv.shape[0]:
        raise ValueError(f"layer must be an integer in [0, {host_kv.shape[0]}) or a tensor of layers, got {layer!r}")
    for name, x in (("src", src), ("slots", slots), ("layer", layer)):
        if isinstance(x, torch.Tensor) and device is not None and x.device != device:
            raise ValueError(f"{name} must be on {device}, got {x.device}")
    return t


def _check_ranges(slots: torch.Tensor, layer: int | torch.Tensor, host_kv: torch.Tensor) -> None:
    """Raise for a slot id >= the layer's tokens or a layer out of range among the rows with slot >= 0."""
    num_tokens = host_kv.shape[1] * host_kv.shape[3]
    keep = slots >= 0
    if bool((slots[keep] >= num_tokens).any()):
        raise ValueError(f"slots must be < {num_tokens} (num_blocks * block_size; negative = skip), "
                         f"got {int(slots[keep].max())}")
    if isinstance(layer, torch.Tensor):
        lay = layer[keep]
        if lay.numel() and not bool(((lay >= 0) & (lay < host_kv.shape[0])).all()):
            raise ValueError(f"layer values must be in [0, {host_kv.shape[0]}), got {lay.min()} .. {lay.max()}")


class FlashD2HScatter(UvaCopy):
    """One-launch row scatter device -> pinned host store (see the module docstring). `plan` once, `run` many."""

    def __init__(self, *, num_sms: int | None = None, tile_bytes: int = 16384, num_warps: int = 4):
        super().__init__(num_sms=num_sms, tile_bytes=tile_bytes, num_warps=num_warps)

    def plan(self, host_kv: torch.Tensor, device: torch.device | str) -> "FlashD2HScatter":
        """Validate the store; fix word size, tile geometry and grid bound for sources on `device`. Returns self."""
        host_kv = _check_store(host_kv)
        device = torch.device(device)
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            if not host_kv.is_pinned():
                raise ValueError("host_kv must be pinned host memory (HostKVStore(pin=True)) for a GPU source")
        elif device.type == "cpu":
            if not _INTERPRET:
                raise ValueError("device cpu needs TRITON_INTERPRET=1 for the kernel; use flash_d2h_scatter_torch")
        else:
            raise ValueError(f"device must be a CUDA device (or the CPU under TRITON_INTERPRET=1), got {device}")
        row_bytes = host_kv.shape[4] * host_kv.element_size()
        for word_bytes, word_dtype in _WORD_DTYPES:
            if row_bytes % word_bytes == 0 and host_kv.data_ptr() % word_bytes == 0:
                break
        row_words = row_bytes // word_bytes
        row_block = next_pow2(row_words)
        self._host_kv = host_kv  # keeps the store alive while planned
        self._dst_addr = host_kv.data_ptr()
        self._word_dtype, self._word_bytes = word_dtype, word_bytes
        self._device = device
        self._out_of_range = torch.zeros(1, dtype=torch.int64, device=device)
        self._dims = (host_kv.shape[0], host_kv.shape[1])  # num_layers, num_blocks
        self._constexprs = dict(
            HKV=host_kv.shape[2],
            BLOCK_SIZE=host_kv.shape[3],
            ROW_WORDS=row_words,
            ROW_BLOCK=row_block,
            TOKENS=max(1, (self.tile_bytes // word_bytes) // row_block),
            DST_ALIGNED=host_kv.data_ptr() % 16 == 0,
        )
        self._finish_plan(word_bytes, device)
        return self

    def run(self, src: torch.Tensor, slots: torch.Tensor, layer: int | torch.Tensor,
            saved: torch.Tensor | None = None) -> None:
        """Launch the scatter of `src[:len(slots)]` into the planned store; asynchronous on the current stream.
        `saved`: an int64 one-element tensor on the device that the kernel adds the tokens it wrote to."""
        self._require_plan("host_kv, device")
        t = _check_rows(src, slots, layer, self._host_kv, self._device)
        if saved is not None and (not isinstance(saved, torch.Tensor) or saved.dtype != torch.int64
                                  or saved.numel() != 1 or saved.device != self._device):
            raise ValueError(f"saved must be None or an int64 tensor of one element on {self._device}, got "
                             f"{saved!r:.80}")
        for name, x in (("src", src), ("slots", slots), ("layer", layer)):
            if isinstance(x, torch.Tensor) and not x.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
        if src.data_ptr() % self._word_bytes:
            raise ValueError(f"src must start at a multiple of {self._word_bytes} bytes (the planned word size)")
        if t == 0:
            return
        per_row = isinstance(layer, torch.Tensor)
        c = self._constexprs
        grid = (min(self._max_programs, triton.cdiv(t, c["TOKENS"]) * c["HKV"]),)
        args = (src.view(self._word_dtype), self._dst_addr, slots, layer if per_row else slots, self._out_of_range,
                self._out_of_range if saved is None else saved, t, 0 if per_row else layer, *self._dims)
        flags = dict(PER_ROW_LAYER=per_row, COUNT_SAVED=saved is not None, num_warps=self.num_warps)
        if self._device.type == "cuda":
            with torch.cuda.device(self._device):  # Triton launches on the current device
                _flash_d2h_scatter_kernel[grid](*args, **c, **flags)
        else:
            _flash_d2h_scatter_kernel[grid](*args, **c, **flags)

    def take_out_of_range(self) -> int:
        """Tokens skipped for an out-of-range slot or layer since the last call; resets the count. Synchronizes the
        current stream (the launches' stream, or one that waits for them)."""
        if not self._planned:
            raise ValueError("call plan(host_kv, device) before take_out_of_range()")
        n = int(self._out_of_range.item())
        if n:
            self._out_of_range.zero_()
        return n


def flash_d2h_scatter_torch(host_kv: torch.Tensor, src: torch.Tensor, slots: torch.Tensor,
                            layer: int | torch.Tensor) -> torch.Tensor:
    """Reference semantics of the scatter with index assignment (any device for src; synchronizes). Returns host_kv.

    Unlike the kernel it raises `ValueError` for a slot id or layer out of range (rows with a negative slot skipped).
    """
    host_kv = _check_store(host_kv)
    t = _check_rows(src, slots, layer, host_kv, None)
    slots = slots.to("cpu", torch.int64)
    if isinstance(layer, torch.Tensor):
        layer = layer.to("cpu", torch.int64)
    _check_ranges(slots, layer, host_kv)
    keep = slots >= 0
    s = slots[keep]
    lay = layer[keep] if isinstance(layer, torch.Tensor) else layer
    bs = host_kv.shape[3]
    host_kv[lay, s // bs, :, s % bs] = src[:t].to("cpu")[keep]
    return host_kv
