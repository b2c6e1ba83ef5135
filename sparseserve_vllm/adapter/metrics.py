"""Prometheus bridge: the plugin's counters on vLLM's `/metrics`, each prefixed `sparseserve_`.

The counters live in vLLM's worker processes; they publish to `$SPARSESERVE_STATS_DIR` (see `stats.py`) and
this collector, registered in every process's default `prometheus_client` registry (the one vLLM's API server
serves), sums those files at scrape time.
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sparseserve_vllm.stats import COUNTER_NAMES, GAUGE_NAMES, read_totals

_HELP = {
    "decode_steps": "Sparse decode layer-steps run by SparseServe",
    "decode_queries": "Decode query rows attended sparsely (request x layer)",
    "pages_scored": "KV pages scored for selection (request x layer x KV head x page)",
    "pages_selected": "KV pages attended by sparse decode (request x layer x KV head x page)",
    "tokens_attended": "Tokens attended by sparse decode (request x layer x KV head x token)",
    "dense_tokens": "Query tokens attended densely (prefill and dense layers, x layer)",
    "pages_summarized": "Page metadata entries written (layer x KV head x page)",
    "hbm_hits": "Selected pages found in the HBM page cache",
    "hbm_misses": "Pages loaded from host DRAM into the HBM page cache",
    "hbm_evictions": "Pages evicted from the HBM page cache",
    "bytes_h2d": "Bytes loaded from host DRAM to HBM",
    "bytes_d2h": "Bytes saved from HBM to host DRAM",
    "hbm_pages_in_use": "HBM page cache slots holding a page",
    "host_blocks_in_use": "Logical KV blocks (host DRAM tier) allocated to requests",
    "parked_steps": "Request-steps a running decode request was parked because the HBM working set was full",
    "segment_token_layers": "Prompt tokens x layers run by layer-segmented prefill",
    "segment_steps": "Engine steps that ran layer-segmented prefill work",
    "segment_steps_with_decodes": "Engine steps that ran layer-segmented prefill work beside decode requests",
    "segment_last_token_layers": "Layers whose attention for a prompt's last token was kept from its layer-segmented prefill",
    "segment_peak_bytes": "Most HBM bytes one layer-segmented prefill held (hidden states + one layer's KV)",
    "working_set_bytes": "Estimated HBM working set (bytes) of the decode requests scheduled in the last step",
    "batch_cap": "Decode requests the HBM working set let run in the last step (working-set-aware batch size)",
}


class SparseServeCollector:
    def collect(self):
        totals = read_totals()
        for name in COUNTER_NAMES:
            family = CounterMetricFamily(f"sparseserve_{name}", _HELP[name])
            family.add_metric([], totals[name])
            yield family
        for name in GAUGE_NAMES:
            family = GaugeMetricFamily(f"sparseserve_{name}", _HELP[name])
            family.add_metric([], totals[name])
            yield family


_registered = False


def register_collector() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(SparseServeCollector())
        _registered = True
