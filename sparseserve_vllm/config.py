"""`SparseServeConfig`: the plugin's one typed configuration.

Contract:
- Read from vLLM's `--additional-config` JSON (or `LLM(additional_config=...)`) under the key `sparseserve`.
  Every key is optional; an absent `sparseserve` key means all defaults.
- An unknown key, a value of the wrong type or a value out of range raises `SparseServeConfigError`
  (a `ValueError`) whose message names the key and the allowed values. Nothing is silently ignored.
- Checks that need vLLM's resolved numbers (block size, head counts) live in `validate_against()`, which
  takes plain ints so this module never imports vLLM.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

CONFIG_KEY = "sparseserve"
SELECTORS = ("cuboid_mean", "quest", "mean")
GQA_REDUCES = ("sum", "max", "mass", "zmax")
# How each selector combines the page scores of a KV head's query heads when `gqa_reduce` is null: the cheapest of
# the most accurate in the pass-key evaluation (benchmarks/results/README.md, "Accuracy on CPU"). `mass` lets the
# mean key reach dense accuracy at budgets 1024 and 2048; with 32-token pages `zmax` brought quest closest to dense
# (37 of 40 placements against `sum`'s 33, dense 38); cuboid_mean does as well with `sum` as with `mass` or `zmax`.
DEFAULT_GQA_REDUCE = {"cuboid_mean": "sum", "quest": "zmax", "mean": "mass"}
# Each selector's page size when `page_size` is null, from the same evaluation: with 64-token pages quest finds the
# key wherever dense attention does (18 of 20 placements and 38 of 40, at budgets 1024 and 2048); with 32-token
# pages it lost one placement at 1024 (and one of 40 at 2048), with 16-token pages half of them. The means reach dense
# accuracy with 32-token pages, which select at a finer grain.
DEFAULT_PAGE_SIZE = {"cuboid_mean": 32, "quest": 64, "mean": 32}
# `sink_pages` and `recent_pages` when null: two pages each, one when pages hold this many tokens or more.
ONE_WINDOW_PAGE_FROM = 64


class SparseServeConfigError(ValueError):
    """A `sparseserve` setting is invalid; the message names the setting and what is allowed."""


@dataclass(frozen=True)
class SparseServeConfig:
    token_budget: int = 2048
    """Tokens each KV head attends to per decode step (sink + recent + top-scored pages)."""
    page_size: int | None = None
    """Tokens per selectable page; must divide vLLM's KV block size (null: the selector's default, 64 for `quest`, 32
    otherwise)."""
    selector: str = "cuboid_mean"
    """Page metadata and score: `cuboid_mean` (ArkVale), `quest` (min/max), `mean` (InfLLM)."""
    gqa_reduce: str | None = None
    """How the query heads of a KV head combine their page scores into the one selection per KV head: `sum`, `max`,
    `mass` (each head's softmax over the pages, summed: the group's estimated attention mass on a page) or `zmax`
    (each head's scores standardized over the pages, then the maximum); null: the selector's default, `sum` for
    `cuboid_mean`, `zmax` for `quest`, `mass` for `mean`."""
    sink_pages: int | None = None
    """Leading pages always attended (null: 2, or 1 with pages of 64 tokens or more)."""
    recent_pages: int | None = None
    """Most recent full pages always attended; the last, partly filled page is always attended too (null: 2, or 1
    with pages of 64 tokens or more)."""
    dense_layers: int = 0
    """The first `dense_layers` decoder layers attend densely."""
    offload: bool = False
    """Keep all KV in pinned host DRAM and only a page cache in HBM."""
    host_kv_gib: float | None = None
    """Pinned host memory for KV with `offload` on (GiB)."""
    hbm_cache_gib: float | None = None
    """HBM page cache with `offload` on (GiB)."""
    working_set_window: int = 12
    """Decode steps whose selections form a request's working set."""
    batch_control: bool = True
    """With `offload`: admit decode requests while their working sets fit the HBM cache (false: vLLM's own
    admission, which lets the cache thrash; for comparison)."""
    layer_segmented_prefill: bool | None = None
    """With `offload`: prefill prompts longer than vLLM's step token budget (`max_num_batched_tokens`) a segment of
    layers per engine step, beside the step's decodes (null: on with offload for Llama and Qwen2 models)."""
    max_inject_tokens: int | None = None
    """Layer-segmented prefill work per engine step, in token x layer units (null: `max_num_batched_tokens` x the
    model's layers, the work of one chunk of chunked prefill)."""
    stats_interval_s: float = 10.0
    """Seconds between the plugin's statistics log lines (0 turns the log line off)."""

    _RANGES: ClassVar[dict[str, str]] = {
        "token_budget": "an integer >= page_size",
        "page_size": "a power of two between 8 and 256, or null (the selector's default)",
        "selector": f"one of {', '.join(SELECTORS)}",
        "gqa_reduce": f"one of {', '.join(GQA_REDUCES)}, or null (the selector's default)",
        "sink_pages": "an integer >= 0, or null (2, or 1 with pages of 64 tokens or more)",
        "recent_pages": "an integer >= 0, or null (2, or 1 with pages of 64 tokens or more)",
        "dense_layers": "an integer >= 0",
        "offload": "true or false",
        "host_kv_gib": "a number > 0 (required when offload is true)",
        "hbm_cache_gib": "a number > 0 (required when offload is true)",
        "working_set_window": "an integer >= 1",
        "batch_control": "true or false",
        "layer_segmented_prefill": "true, false or null (null: on with offload for Llama and Qwen2 models)",
        "max_inject_tokens": "an integer >= 1, or null (max_num_batched_tokens x layers)",
        "stats_interval_s": "a number >= 0",
    }

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if self.selector not in SELECTORS:
            self._fail("selector", self.selector)
        # Null page geometry resolves here, so every reader sees ints (the object is frozen afterwards).
        if self.page_size is None:
            object.__setattr__(self, "page_size", DEFAULT_PAGE_SIZE[self.selector])
        p = self.page_size
        if p < 8 or p > 256 or p & (p - 1):
            self._fail("page_size", p)
        for name in ("sink_pages", "recent_pages"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, 1 if p >= ONE_WINDOW_PAGE_FROM else 2)
        if self.token_budget < p:
            self._fail("token_budget", self.token_budget)
        if self.gqa_reduce is not None and self.gqa_reduce not in GQA_REDUCES:
            self._fail("gqa_reduce", self.gqa_reduce)
        for name in ("sink_pages", "recent_pages", "dense_layers"):
            if getattr(self, name) < 0:
                self._fail(name, getattr(self, name))
        if self.sink_pages + self.recent_pages + 1 > self.num_select_pages:
            raise SparseServeConfigError(
                f"sparseserve: sink_pages ({self.sink_pages}) + recent_pages ({self.recent_pages}) + 1 "
                f"(the last, partial page) must fit in token_budget // page_size = {self.num_select_pages} pages"
            )
        if self.working_set_window < 1:
            self._fail("working_set_window", self.working_set_window)
        if self.max_inject_tokens is not None and self.max_inject_tokens < 1:
            self._fail("max_inject_tokens", self.max_inject_tokens)
        if self.layer_segmented_prefill and not self.offload:
            raise SparseServeConfigError(
                "sparseserve: layer_segmented_prefill needs offload=true (without offload vLLM's chunked prefill "
                "runs); set offload to true or remove layer_segmented_prefill")
        if self.max_inject_tokens is not None and (not self.offload or self.layer_segmented_prefill is False):
            raise SparseServeConfigError(
                "sparseserve: max_inject_tokens sizes layer-segmented prefill, which runs only with offload=true and "
                "layer_segmented_prefill not false; remove max_inject_tokens or turn them on")
        if self.stats_interval_s < 0 or not math.isfinite(self.stats_interval_s):
            self._fail("stats_interval_s", self.stats_interval_s)
        if not self.batch_control and not self.offload:
            raise SparseServeConfigError(
                "sparseserve: batch_control is only used when offload is true; set offload to true or remove "
                "batch_control")
        for name in ("host_kv_gib", "hbm_cache_gib"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v <= 0):
                self._fail(name, v)
            if self.offload and v is None:
                raise SparseServeConfigError(f"sparseserve: {name} is required when offload is true; allowed: {self._RANGES[name]}")
            if not self.offload and v is not None:
                raise SparseServeConfigError(f"sparseserve: {name} is only used when offload is true; set offload to true or remove {name}")

    @property
    def num_select_pages(self) -> int:
        return self.token_budget // self.page_size

    @property
    def resolved_gqa_reduce(self) -> str:
        """`gqa_reduce`, or the selector's default when it is null."""
        return self.gqa_reduce or DEFAULT_GQA_REDUCE[self.selector]

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None) -> "SparseServeConfig":
        raw = (additional_config or {}).get(CONFIG_KEY, {})
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise SparseServeConfigError(
                f"additional_config['{CONFIG_KEY}'] must be a JSON object of settings, got {type(raw).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SparseServeConfigError(
                f"sparseserve: unknown setting(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(known))}"
            )
        return cls(**raw)

    def validate_against(self, *, block_size: int | None, num_layers: int | None = None) -> None:
        """Checks that need vLLM's resolved geometry."""
        if block_size is not None and block_size % self.page_size:
            raise SparseServeConfigError(
                f"sparseserve: page_size ({self.page_size}) must divide vLLM's KV block size ({block_size}); "
                f"allowed: a power of two <= {block_size} that divides it (null means the selector's default: "
                f"{', '.join(f'{k} {v}' for k, v in DEFAULT_PAGE_SIZE.items())}), or change --block-size"
            )
        if num_layers is not None and self.dense_layers > num_layers:
            raise SparseServeConfigError(
                f"sparseserve: dense_layers ({self.dense_layers}) exceeds the model's {num_layers} attention layers; "
                f"allowed: 0..{num_layers}"
            )

    def _fail(self, name: str, value: Any) -> None:
        raise SparseServeConfigError(f"sparseserve: invalid {name}={value!r}; allowed: {self._RANGES[name]}")


def _check_type(name: str, value: Any, annotation: str) -> None:
    allowed = {
        "int": (int,),
        "float": (int, float),
        "bool": (bool,),
        "str": (str,),
        "float | None": (int, float, type(None)),
        "int | None": (int, type(None)),
        "bool | None": (bool, type(None)),
        "str | None": (str, type(None)),
    }[annotation]
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        raise SparseServeConfigError(
            f"sparseserve: {name} must be {annotation.replace(' | None', ' or null')}, got {value!r} "
            f"({type(value).__name__}); allowed: {SparseServeConfig._RANGES.get(name, annotation)}"
        )
