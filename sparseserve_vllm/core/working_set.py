"""Working-set estimate of requests: `WorkingSetTracker` and the byte/page sizing helpers.

Contract:
- The worker reports, per decode step and per layer, the pages the sparse selector picked for the decode
  requests, as logical flat page ids `(block * Hkv + head) * ppb + page_in_block` (any shape, int64, -1 = padding).
- `WorkingSetTracker` keeps one stamp per `(layer, page)`: `last_selected` int32 [num_layers, num_logical_pages],
  the decode step at which the page was last selected, `NEVER` (int32 min) when it never was or was forgotten.
  `step` counts `end_step()` calls; `record` stamps with `step` (the step still open), read from a device copy of
  it, so `record` reads no Python state: a CUDA graph that captured it stamps the current step at replay.
- The working set of a request is the number of distinct `(layer, page)` among its owned pages whose stamp is
  `>= step - window`, i.e. selected in the last `window` completed decode steps or in the open one. Called between
  steps (after `end_step()`), that is exactly the union of the selections of the last `window` decode steps. Times
  `bytes_per_page` it is the request's working set in bytes (paper section 3.3, w = 12 by default).
- Stamps are per page, not per request: pages shared by several requests (prefix caching) count for each of them,
  which over-estimates the sum (conservative for admission). `forget(pages)` must be called when a request's pages
  are freed, before their ids are reused.
- A request with no selection in the window (new, or not run for `window` steps) is estimated from the token
  budget: `decode_budget_pages`. A prefill's need is exact: `prefill_pages`.
- Everything is vectorized over pages and requests; nothing synchronizes with the host except the bounds check of
  page ids (one sync per call, switch off with `check_bounds=False` when ids come from trusted kernels).
- Bad arguments raise `ValueError` naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NEVER", "WorkingSetTracker", "decode_budget_pages", "page_bytes", "prefill_pages"]

NEVER = torch.iinfo(torch.int32).min
"""Stamp of a page that was never selected (or was forgotten)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def page_bytes(*, page_size: int, head_dim: int, element_size: int) -> int:
    """Bytes of one page: `page_size` tokens of one KV head, K and V (`page_size * 2 * head_dim * element_size`)."""
    _check_int("page_size", page_size, 1)
    _check_int("head_dim", head_dim, 1)
    _check_int("element_size", element_size, 1)
    return page_size * 2 * head_dim * element_size


def decode_budget_pages(
    *,
    num_layers: int,
    num_kv_heads: int,
    token_budget: int,
    context_len: int | torch.Tensor,
    page_size: int,
    dense_layers: int = 0,
) -> int | torch.Tensor:
    """Pages one decode step of a request reads when it has no selection history.

    Sparse layers: `num_kv_heads * ceil(min(token_budget, context_len) / page_size)` pages each (the partial last
    page included); the first `dense_layers` layers read the whole context, `num_kv_heads * ceil(context_len / page_size)`.
    `context_len` is an int (returns an int) or an integer tensor of lengths (returns int64 of its shape).
    """
    _check_int("num_layers", num_layers, 1)
    _check_int("num_kv_heads", num_kv_heads, 1)
    _check_int("token_budget", token_budget, 1)
    _check_int("page_size", page_size, 1)
    _check_int("dense_layers", dense_layers, 0)
    if dense_layers > num_layers:
        raise ValueError(f"dense_layers must be <= num_layers ({num_layers}), got {dense_layers}")
    if isinstance(context_len, torch.Tensor):
        if context_len.dtype.is_floating_point or context_len.dtype.is_complex or context_len.dtype == torch.bool:
            raise ValueError(f"context_len must be an int or an integer tensor, got dtype {context_len.dtype}")
        context_len = context_len.to(torch.int64)
        attended = context_len.clamp(max=token_budget)
    else:
        _check_int("context_len", context_len, 0)
        attended = min(token_budget, context_len)
    sparse = (num_layers - dense_layers) * ((attended + page_size - 1) // page_size)
    dense = dense_layers * ((context_len + page_size - 1) // page_size)
    return num_kv_heads * (sparse + dense)


def prefill_pages(*, num_layers: int, num_kv_heads: int, prompt_tokens: int, page_size: int, layer_segmented: bool) -> int:
    """Exact pages a prefill needs resident: the whole prompt's KV of every layer (chunked prefill) or of one layer
    (layer-segmented prefill, which saves and evicts each layer's KV before the next), partial last page included."""
    _check_int("num_layers", num_layers, 1)
    _check_int("num_kv_heads", num_kv_heads, 1)
    _check_int("prompt_tokens", prompt_tokens, 0)
    _check_int("page_size", page_size, 1)
    if not isinstance(layer_segmented, bool):
        raise ValueError(f"layer_segmented must be a bool, got {layer_segmented!r}")
    layers = 1 if layer_segmented else num_layers
    return layers * num_kv_heads * _ceil_div(prompt_tokens, page_size)


class WorkingSetTracker:
    def __init__(
        self,
        num_layers: int,
        num_logical_pages: int,
        bytes_per_page: int,
        window: int = 12,
        device: torch.device | str = "cpu",
        check_bounds: bool = True,
    ):
        _check_int("num_layers", num_layers, 1)
        _check_int("num_logical_pages", num_logical_pages, 1)
        _check_int("bytes_per_page", bytes_per_page, 1)
        _check_int("window", window, 1)
        self.num_layers = num_layers
        self.num_logical_pages = num_logical_pages
        self.bytes_per_page = bytes_per_page
        self.window = window
        self.check_bounds = check_bounds
        self.device = torch.empty(0, device=device).device  # normalized, e.g. "cuda" -> cuda:0
        # One trailing trash column absorbs the writes of -1 padding without boolean-mask indexing.
        self._stamps = torch.full((num_layers, num_logical_pages + 1), NEVER, dtype=torch.int32, device=self.device)
        self.step = 0
        self._step = torch.zeros((), dtype=torch.int32, device=self.device)  # `step` on the device, for `record`

    @property
    def last_selected(self) -> torch.Tensor:
        """int32 [num_layers, num_logical_pages]: decode step of each page's last selection, `NEVER` if none (a view)."""
        return self._stamps[:, :-1]

    def record(self, layer: int, pages: torch.Tensor) -> None:
        """Stamp the pages selected in `layer` during the open step (`pages`: int tensor of any shape, -1 ignored)."""
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        pages = self._check_pages("pages", pages).reshape(-1)
        self._stamps[layer, pages] = self._step  # -1 indexes the last column: the trash column

    def end_step(self) -> None:
        """Close the open decode step."""
        self.step += 1
        self._step.add_(1)

    def forget(self, pages: torch.Tensor) -> None:
        """Clear the stamps of `pages` in every layer (their request finished; -1 ignored)."""
        pages = self._check_pages("pages", pages).reshape(-1)
        self._stamps[:, pages] = NEVER  # -1: the trash column

    def recent_layer_counts(self) -> torch.Tensor:
        """int64 [num_logical_pages]: in how many layers each page was selected within the window."""
        return (self.last_selected >= self.step - self.window).sum(dim=0)

    def working_set_pages(self, owned_pages: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """int64 [R]: working set, in pages over all layers, of each of R requests.

        `owned_pages` is a padded int tensor [R, P] (-1 = padding) or a sequence of R 1-D int tensors, each holding
        the logical flat page ids a request owns (all its KV heads). Pages listed twice for one request count twice.
        """
        counts = self.recent_layer_counts()
        if isinstance(owned_pages, torch.Tensor):
            if owned_pages.dim() != 2:
                raise ValueError(f"owned_pages must be a 2-D [R, P] tensor or a sequence of 1-D tensors, got shape {tuple(owned_pages.shape)}")
            owned = self._check_pages("owned_pages", owned_pages)
            return torch.where(owned >= 0, counts[owned.clamp(min=0)], 0).sum(dim=1)
        rows = [self._check_pages(f"owned_pages[{i}]", p, bounds=False).reshape(-1) for i, p in enumerate(owned_pages)]
        result = torch.zeros(len(rows), dtype=torch.int64, device=self.device)
        if not rows:
            return result
        flat = self._check_pages("owned_pages", torch.cat(rows))
        request = torch.repeat_interleave(
            torch.arange(len(rows), device=self.device),
            torch.tensor([r.numel() for r in rows], device=self.device),
            output_size=flat.numel(),
        )
        return result.index_add_(0, request, torch.where(flat >= 0, counts[flat.clamp(min=0)], 0))

    def estimate_decode_bytes(
        self,
        ws_pages: torch.Tensor,
        context_lens: torch.Tensor,
        *,
        num_kv_heads: int,
        token_budget: int,
        page_size: int,
        dense_layers: int = 0,
    ) -> torch.Tensor:
        """int64 [R]: decode working-set estimate in bytes; `ws_pages` [R] from `working_set_pages`, and where it is
        0 (no selection in the window) the budget estimate `decode_budget_pages` for `context_lens` [R]."""
        if ws_pages.shape != context_lens.shape or ws_pages.dim() != 1:
            raise ValueError(
                f"ws_pages and context_lens must be 1-D of equal length, got {tuple(ws_pages.shape)} and {tuple(context_lens.shape)}"
            )
        budget = decode_budget_pages(
            num_layers=self.num_layers,
            num_kv_heads=num_kv_heads,
            token_budget=token_budget,
            context_len=context_lens.to(self.device),
            page_size=page_size,
            dense_layers=dense_layers,
        )
        ws = ws_pages.to(device=self.device, dtype=torch.int64)
        return torch.where(ws > 0, ws, budget) * self.bytes_per_page

    def _check_pages(self, name: str, pages: torch.Tensor, bounds: bool = True) -> torch.Tensor:
        if not isinstance(pages, torch.Tensor) or pages.dtype.is_floating_point or pages.dtype.is_complex or pages.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {pages!r:.80}")
        if pages.device != self.device:
            raise ValueError(f"{name} must be on the tracker's device {self.device}, got {pages.device}")
        if pages.dtype not in (torch.int32, torch.int64):
            pages = pages.to(torch.int64)
        if bounds and self.check_bounds and pages.numel():
            lo, hi = torch.stack([pages.min(), pages.max()]).tolist()
            if lo < -1 or hi >= self.num_logical_pages:
                raise ValueError(
                    f"{name} must hold logical flat page ids in [0, {self.num_logical_pages}) or -1 (padding); got values in [{lo}, {hi}]"
                )
        return pages
