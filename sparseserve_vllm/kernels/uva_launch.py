"""Launch settings shared by the two UVA copy kernels (FlashH2D gather, FlashD2H scatter).

- `check_launch(num_sms, tile_bytes, num_warps)`: raises `ValueError` naming the setting unless `num_sms` is None (all
  SMs) or an int >= 1, `tile_bytes` a power of two >= 16 and `num_warps` a power of two in [1, 32].
- `next_pow2(n)`: the smallest power of two >= n (n >= 1).
- `max_programs(num_sms, device)`: the persistent grid's bound: `num_sms`, else the device's SM count (4 under the
  Triton interpreter on the CPU, where programs run one after another anyway).
- `host_pointer(addr, like, ALIGNED)` (Triton device function): the pinned host address `addr` (a kernel int
  argument: i32 when the address is small, else i64) as a pointer of `like`'s element type, marked 16-byte aligned
  when `ALIGNED` (an int carries no alignment, so without it loads/stores are not vectorized).
- `UvaCopy`: base of the two kernels' plan/run objects: validated launch settings, `_finish_plan(word_bytes,
  device)` at the end of `plan`, `_require_plan(what)` in `run`, and the `geometry` property.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def host_pointer(addr, like, ALIGNED: tl.constexpr):
    ptr = addr.to(tl.int64).to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


def check_launch(num_sms: int | None, tile_bytes: int, num_warps: int) -> None:
    if num_sms is not None and (not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms < 1):
        raise ValueError(f"num_sms must be None (all SMs) or an integer >= 1, got {num_sms!r}")
    if not isinstance(tile_bytes, int) or tile_bytes < 16 or tile_bytes & (tile_bytes - 1):
        raise ValueError(f"tile_bytes must be a power of two >= 16, got {tile_bytes!r}")
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {num_warps!r}")


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def max_programs(num_sms: int | None, device: torch.device) -> int:
    if num_sms is not None:
        return num_sms
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


class UvaCopy:
    """Launch settings and plan state shared by `FlashH2D` and `FlashD2HScatter`."""

    def __init__(self, *, num_sms: int | None, tile_bytes: int, num_warps: int):
        check_launch(num_sms, tile_bytes, num_warps)
        self.num_sms = num_sms
        self.tile_bytes = tile_bytes
        self.num_warps = num_warps
        self._planned = False
        self._constexprs: dict = {}

    def _finish_plan(self, word_bytes: int, device: torch.device) -> None:
        self._word_bytes = word_bytes
        self._max_programs = max_programs(self.num_sms, device)
        self._planned = True

    def _require_plan(self, what: str) -> None:
        if not self._planned:
            raise ValueError(f"call plan({what}) before run()")

    @property
    def geometry(self) -> dict[str, int | bool]:
        """The planned kernel constants (word counts are in units of the chosen word size)."""
        if not self._planned:
            raise ValueError("call plan() before reading geometry")
        return dict(self._constexprs, WORD_BYTES=self._word_bytes, MAX_PROGRAMS=self._max_programs)
