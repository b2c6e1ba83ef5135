"""`plan_block_runs`: which whole blocks of a save move as contiguous copy-engine runs, and in what order.

Contract:
- `plan_block_runs(block_ids, block_bytes, min_copy_bytes)`: `block_ids` are the m distinct LOGICAL block ids (a
  sequence of ints, or a 1-D integer numpy array / CPU tensor) whose blocks a save fills completely, block i from
  the save's tokens `[i * block_size, (i + 1) * block_size)`. In the host store one layer's blocks lie in block-id
  order, `block_bytes` apart, so blocks with consecutive ids form one contiguous run of host memory whatever
  order the save lists them in. Returns a `BlockRunPlan`:
    `order`  int64 [k]: save positions of the blocks that go by copy: sorted by block id, so that packing the
             blocks in this order makes every run contiguous on the device too;
    `runs`   list of `(first block id, number of blocks)`, the runs in `order`, each at least `min_copy_bytes`
             long (a run of consecutive ids is split nowhere);
    `rest`   int64 [m - k]: save positions of the blocks of shorter runs, in save order (they go by the scatter
             kernel: one copy each would cost more host time than the bytes take on PCIe).
- Raises `ValueError` for negative or repeated ids or a non-positive `block_bytes`.
No vLLM import, no GPU: host-side planning only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BlockRunPlan", "plan_block_runs"]


@dataclass(frozen=True)
class BlockRunPlan:
    order: np.ndarray
    runs: list[tuple[int, int]]
    rest: np.ndarray

    @property
    def identity(self) -> bool:
        """True when the copied blocks are exactly the save's blocks in save order (packing needs no gather)."""
        return self.rest.size == 0 and bool((self.order == np.arange(self.order.size)).all())


def plan_block_runs(block_ids, block_bytes: int, min_copy_bytes: int) -> BlockRunPlan:
    ids = block_ids.numpy() if isinstance(block_ids, torch.Tensor) else np.asarray(block_ids)
    ids = ids.astype(np.int64, copy=False).reshape(-1)
    if not isinstance(block_bytes, int) or block_bytes < 1:
        raise ValueError(f"block_bytes must be an integer >= 1, got {block_bytes!r}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"block ids must be >= 0, got {int(ids.min())}")
    by_id = np.argsort(ids, kind="stable")
    sorted_ids = ids[by_id]
    if ids.size > 1 and (np.diff(sorted_ids) == 0).any():
        raise ValueError("block ids of one save must be distinct")
    breaks = np.flatnonzero(np.diff(sorted_ids) != 1) + 1
    starts = np.concatenate(([0], breaks)) if ids.size else np.zeros(0, dtype=np.int64)
    ends = np.concatenate((breaks, [ids.size])) if ids.size else np.zeros(0, dtype=np.int64)
    min_blocks = -(-min_copy_bytes // block_bytes)
    copied = (ends - starts) >= max(min_blocks, 1)
    order = np.concatenate([by_id[a:b] for a, b in zip(starts[copied], ends[copied])] or [np.zeros(0, np.int64)])
    rest = np.sort(np.concatenate([by_id[a:b] for a, b in zip(starts[~copied], ends[~copied])]
                                  or [np.zeros(0, np.int64)]))
    runs = [(int(sorted_ids[a]), int(b - a)) for a, b in zip(starts[copied], ends[copied])]
    return BlockRunPlan(order.astype(np.int64), runs, rest.astype(np.int64))
