"""`WorkingSetController`: working-set-aware batch admission (paper Algorithm 1), pure Python logic.

Contract:
- Input per step: the candidate requests in arrival (FCFS) order, each an `(request_id, ws_bytes)` pair with
  `ws_bytes >= 0` its working-set estimate (see `core.working_set`), and `capacity_bytes >= 0`, the HBM page-cache
  capacity available to them. Request ids must be hashable and distinct.
- Output (`AdmissionDecision`): the admitted ids, the longest prefix of the candidates whose estimates sum to at
  most `capacity_bytes`, except that the first candidate is always admitted, even when it alone exceeds the
  capacity (so the head of the queue never starves); the rejected ids (the rest, in order); and the bytes used.
- Differences from the paper's Algorithm 1, on purpose: a candidate that does not fit ends the batch (the paper
  goes on testing later, smaller ones). This keeps strict FCFS, matches vLLM's FCFS scheduler (it stops at the
  first waiting request it cannot schedule) and, with the head always admitted, guarantees that every request is
  admitted once the requests before it finish.
- The controller keeps the last decision for metrics: `last_cap` (number admitted), `last_used_bytes` (sum of the
  admitted estimates) and `last_demand_bytes` (sum over all candidates).
- Bad arguments raise `ValueError` naming the argument.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

__all__ = ["AdmissionDecision", "WorkingSetController"]


@dataclass(frozen=True)
class AdmissionDecision:
    admitted: tuple[Hashable, ...]
    """Ids admitted this step, in candidate order."""
    rejected: tuple[Hashable, ...]
    """Ids not admitted this step, in candidate order."""
    used_bytes: int
    """Sum of the admitted candidates' working-set estimates."""
    demand_bytes: int
    """Sum of all candidates' working-set estimates."""
    capacity_bytes: int

    @property
    def cap(self) -> int:
        """Number of requests admitted: the batch size the working set allows."""
        return len(self.admitted)

    @property
    def overcommitted(self) -> bool:
        """True when only the always-admitted head was taken and it alone exceeds the capacity."""
        return self.used_bytes > self.capacity_bytes


class WorkingSetController:
    def __init__(self) -> None:
        self.last_decision: AdmissionDecision | None = None

    @property
    def last_cap(self) -> int:
        return self.last_decision.cap if self.last_decision else 0

    @property
    def last_used_bytes(self) -> int:
        return self.last_decision.used_bytes if self.last_decision else 0

    @property
    def last_demand_bytes(self) -> int:
        return self.last_decision.demand_bytes if self.last_decision else 0

    def admit(self, candidates: Sequence[tuple[Hashable, int]], capacity_bytes: int) -> AdmissionDecision:
        """Admit the FCFS prefix of `candidates` that fits in `capacity_bytes` (the first one always)."""
        if not isinstance(capacity_bytes, int) or isinstance(capacity_bytes, bool) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be an integer >= 0, got {capacity_bytes!r}")
        ids: list[Hashable] = []
        sizes: list[int] = []
        for i, candidate in enumerate(candidates):
            if not isinstance(candidate, tuple) or len(candidate) != 2:
                raise ValueError(f"candidates[{i}] must be a (request_id, ws_bytes) pair, got {candidate!r}")
            request_id, ws_bytes = candidate
            if not isinstance(ws_bytes, int) or isinstance(ws_bytes, bool) or ws_bytes < 0:
                raise ValueError(f"candidates[{i}] ws_bytes must be an integer >= 0, got {ws_bytes!r}")
            ids.append(request_id)
            sizes.append(ws_bytes)
        if len(set(ids)) != len(ids):
            raise ValueError(f"candidates must have distinct request ids, got {ids!r}")

        used = 0
        num_admitted = 0
        for size in sizes:
            if num_admitted > 0 and used + size > capacity_bytes:
                break
            used += size
            num_admitted += 1
        decision = AdmissionDecision(
            admitted=tuple(ids[:num_admitted]),
            rejected=tuple(ids[num_admitted:]),
            used_bytes=used,
            demand_bytes=sum(sizes),
            capacity_bytes=capacity_bytes,
        )
        self.last_decision = decision
        return decision
