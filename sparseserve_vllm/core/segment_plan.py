"""Layer-segmented prefill: which (layer, token range) units of which prompts run in one engine step.

Contract (paper section 2.7; no vLLM import):
- A prompt of `num_tokens` tokens runs layer by layer over ALL its tokens: layer l starts only after layer l-1
  finished every token, so one layer's prompt KV is all the prefill ever holds.
- `SegmentProgress(num_tokens, num_layers)` is where one prompt stands; `take(budget, per_step)` returns the units
  `(layer, start, end)` it runs next within `budget` token x layer units and advances past them:
    * a prompt no longer than `per_step` (the step's whole budget) runs whole layers only: `budget // num_tokens`
      of them (none when less than one layer's work is left);
    * a longer prompt, whose single layer exceeds a step, runs chunks within a layer (`end - start <= budget`),
      continuing into the next layer in the same step when budget is left.
  `take` always makes progress when `budget == per_step` (a step's first prompt).
- `plan_step(progress, per_step)` spends one step's budget over the prompts in arrival order (`progress`, oldest
  first): the units of each, as `[(index, layer, start, end)]`; a prompt that gets nothing stops the walk, so
  later prompts never overtake it.
"""

from __future__ import annotations

from collections.abc import Sequence


class SegmentProgress:
    def __init__(self, num_tokens: int, num_layers: int) -> None:
        if num_tokens < 1 or num_layers < 1:
            raise ValueError(f"num_tokens and num_layers must be >= 1, got {num_tokens}, {num_layers}")
        self.num_tokens = num_tokens
        self.num_layers = num_layers
        self.layer = 0
        self.token = 0  # tokens of `layer` already run

    @property
    def done(self) -> bool:
        return self.layer >= self.num_layers

    def take(self, budget: int, per_step: int) -> list[tuple[int, int, int]]:
        units: list[tuple[int, int, int]] = []
        n = self.num_tokens
        if n <= per_step:
            while budget >= n and not self.done:
                units.append((self.layer, 0, n))
                budget -= n
                self.layer += 1
            return units
        while budget > 0 and not self.done:
            end = min(n, self.token + budget)
            units.append((self.layer, self.token, end))
            budget -= end - self.token
            self.token = end
            if end == n:
                self.layer, self.token = self.layer + 1, 0
        return units


def plan_step(progress: Sequence[SegmentProgress], per_step: int) -> list[tuple[int, int, int, int]]:
    if per_step < 1:
        raise ValueError(f"per_step must be >= 1, got {per_step}")
    budget = per_step
    plan: list[tuple[int, int, int, int]] = []
    for i, p in enumerate(progress):
        if p.done:
            continue
        units = p.take(budget, per_step)
        if not units:
            break
        budget -= sum(end - start for _, start, end in units)
        plan.extend((i, layer, start, end) for layer, start, end in units)
        if not p.done:
            break
    return plan
