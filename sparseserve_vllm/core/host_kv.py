"""`HostKVStore`: the full KV of every request in host DRAM (pinned when it is to be read by a GPU).

Contract:
- One host tensor `kv` of shape `(num_layers, num_logical_blocks, Hkv, block_size, 2*D)` and dtype `dtype`,
  C-contiguous. Per layer it has exactly the HBM cache layout (HND, see docs/helper-brief.md): for logical
  block b, KV head h, token t of layer l, K = `kv[l, b, h, t, :D]` and V = `kv[l, b, h, t, D:]`. So a page
  (block b, head h, page-in-block j) has the same flat page id `(b * Hkv + h) * ppb + j` in `pages(l, ps)` as
  in the HBM cache's flat page view, and a page copies between the tiers as one contiguous run of bytes.
- Block ids are LOGICAL (vLLM's scheduler block ids over the whole DRAM capacity), not HBM slots.
- `pin=True` page-locks the tensor and maps it into the GPU's unified address space (a GPU kernel reads it
  directly at its host address: FlashH2D) and needs CUDA; `pin=False` leaves it ordinary pageable memory.
  Pinning allocates pageable memory and registers it with `cudaHostRegister`, NOT `pin_memory=True`: torch's
  caching host allocator rounds every pinned allocation up to a power of two (80 GiB would pin 128 GiB, all of
  the H200 host). The registration is undone when the store is garbage-collected, so keep the store alive while
  a GPU reads its views.
- The contents are undefined until written (the tensor is allocated with `torch.empty`: zero-filling 80 GiB
  would cost seconds at start-up and every page is written by FlashD2H before it is read).
- Sizes above a limit are refused with a `ValueError` naming `host_kv_gib` (the plugin setting that sizes the
  store). The default limit is `max_pinnable_bytes()`: 70% of the host's MemAvailable at construction. Pinned
  memory cannot be swapped or reclaimed, and the engine processes, the CUDA driver, torch.compile workers and
  the FlashD2H staging buffers need the rest: on the project's H200 host (128 GiB DRAM) vLLM's own CPU offload
  was killed by the kernel's OOM reaper when asked for 100 GiB (its `pin_memory=True` allocation was most
  likely rounded up to 128 GiB, see `pin` above).
"""

from __future__ import annotations

import os
import weakref

import torch

__all__ = ["PINNABLE_FRACTION", "HostKVStore", "max_pinnable_bytes"]

PINNABLE_FRACTION = 0.7
"""Largest share of the host's MemAvailable the store may take (see the module docstring)."""

_GIB = float(1 << 30)


def max_pinnable_bytes(meminfo_path: str = "/proc/meminfo") -> int:
    """`PINNABLE_FRACTION` of the host's currently available memory (MemAvailable of /proc/meminfo), in bytes.

    Where /proc/meminfo does not exist (not Linux), the number of available physical pages is used instead.
    """
    available = None
    if os.path.exists(meminfo_path):
        with open(meminfo_path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    value, unit = line.split()[1:3]
                    if unit != "kB":
                        raise ValueError(f"{meminfo_path}: unexpected unit {unit!r} for MemAvailable")
                    available = int(value) * 1024
                    break
        if available is None:
            raise ValueError(f"{meminfo_path} has no MemAvailable line")
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * PINNABLE_FRACTION)


def _unregister(ptr: int) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(ptr))


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class HostKVStore:
    """The authoritative copy of every KV block, all layers, in host memory (see the module docstring)."""

    def __init__(
        self,
        num_layers: int,
        num_logical_blocks: int,
        num_kv_heads: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        pin: bool,
        *,
        limit_bytes: int | None = None,
    ):
        self.num_layers = _positive_int("num_layers", num_layers)
        self.num_logical_blocks = _positive_int("num_logical_blocks", num_logical_blocks)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.block_size = _positive_int("block_size", block_size)
        self.head_dim = _positive_int("head_dim", head_dim)
        if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype in (torch.int8, torch.uint8)):
            raise ValueError(f"dtype must be a floating torch dtype (or int8/uint8 for quantized KV), got {dtype!r}")
        self.dtype = dtype
        if not isinstance(pin, bool):
            raise ValueError(f"pin must be True or False, got {pin!r}")
        if pin and not torch.cuda.is_available():
            raise ValueError("pin=True needs CUDA (pinned memory is page-locked for a GPU); pass pin=False without a GPU")
        self.pin = pin
        shape = (num_layers, num_logical_blocks, num_kv_heads, block_size, 2 * head_dim)
        need = self.bytes_per_block(num_layers, num_kv_heads, block_size, head_dim, dtype) * num_logical_blocks
        limit = max_pinnable_bytes() if limit_bytes is None else limit_bytes
        if need > limit:
            source = "the given limit_bytes" if limit_bytes is not None else f"{PINNABLE_FRACTION:.0%} of MemAvailable"
            raise ValueError(
                f"host_kv_gib: the host KV store needs {need / _GIB:.2f} GiB ({num_logical_blocks} logical blocks "
                f"of {num_layers} layers) but at most {limit / _GIB:.2f} GiB may be "
                f"{'pinned' if pin else 'allocated'} ({source}); lower host_kv_gib"
            )
        self.kv = torch.empty(shape, dtype=dtype)
        if pin:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(self.kv.data_ptr(), need, 0))
            weakref.finalize(self, _unregister, self.kv.data_ptr()).atexit = False  # the OS frees it at exit

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        """Host bytes of one logical block over all layers (K and V)."""
        return num_layers * num_kv_heads * block_size * 2 * head_dim * torch.empty(0, dtype=dtype).element_size()

    @classmethod
    def blocks_for_gib(
        cls, host_kv_gib: float, num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """How many logical blocks `host_kv_gib` GiB hold (at least 1, else `ValueError` naming host_kv_gib)."""
        per_block = cls.bytes_per_block(num_layers, num_kv_heads, block_size, head_dim, dtype)
        if not isinstance(host_kv_gib, (int, float)) or isinstance(host_kv_gib, bool) or not host_kv_gib > 0:
            raise ValueError(f"host_kv_gib must be a number > 0, got {host_kv_gib!r}")
        blocks = int(host_kv_gib * _GIB) // per_block
        if blocks < 1:
            raise ValueError(
                f"host_kv_gib={host_kv_gib} holds no block: one logical block needs {per_block} bytes over all layers"
            )
        return blocks

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def num_tokens(self) -> int:
        """Token capacity per layer (num_logical_blocks * block_size)."""
        return self.num_logical_blocks * self.block_size

    def layer(self, layer: int) -> torch.Tensor:
        """The layer's cache `(num_logical_blocks, Hkv, block_size, 2D)`, a view."""
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an integer in [0, {self.num_layers}), got {layer!r}")
        return self.kv[layer]

    def pages(self, layer: int, page_size: int) -> torch.Tensor:
        """Flat page view `(num_logical_blocks * Hkv * ppb, page_size, 2D)` of a layer, a view (never a copy)."""
        if not isinstance(page_size, int) or page_size < 1 or self.block_size % page_size:
            raise ValueError(f"page_size must be a positive divisor of block_size={self.block_size}, got {page_size!r}")
        ppb = self.block_size // page_size
        return self.layer(layer).view(self.num_logical_blocks * self.num_kv_heads * ppb, page_size, 2 * self.head_dim)
