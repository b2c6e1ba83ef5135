"""Launch settings shared by the two UVA copy kernels (FlashH2D gather, FlashD2H scatter).

- `check_launch(num_sms, tile_bytes, num_warps)`: raises `ValueError` naming the setting unless `num_sms` is None (all
  SMs) or an int >= 1, `tile_bytes` a power of two >= 16 and `num_warps` a power of two in [1, 32].
- `next_pow2(n)`: the smallest power of two >= n (n >= 1).
"""

from __future__ import annotations


def check_launch(num_sms: int | None, tile_bytes: int, num_warps: int) -> None:
    if num_sms is not None and (not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms < 1):
        raise ValueError(f"num_sms must be None (all SMs) or an integer >= 1, got {num_sms!r}")
    if not isinstance(tile_bytes, int) or tile_bytes < 16 or tile_bytes & (tile_bytes - 1):
        raise ValueError(f"tile_bytes must be a power of two >= 16, got {tile_bytes!r}")
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {num_warps!r}")


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
