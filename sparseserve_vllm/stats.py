"""The plugin's statistics: counters kept by the worker, published to a shared folder, read anywhere.

Contract:
- `Counters` holds one process's monotone counters (`COUNTER_NAMES`) and gauges (`GAUGE_NAMES`), as ints;
  `process_counters()` is the one instance every part of the plugin in a process adds to (scheduler, connector and
  worker share one process under vLLM's single-GPU executor, and one file per process).
- `publish(counters)` writes them atomically to `$SPARSESERVE_STATS_DIR/<pid>.json`; `read_totals(dir)` sums
  every process's file (gauges only of processes still alive). `ensure_stats_dir()` creates the folder once in the first process and exports it in
  the environment, so processes that vLLM spawns later (engine core, workers) publish to the same place.
- `format_line(totals)` is the one-line summary used by the periodic log line and the README's main job.
No vLLM import: the Prometheus bridge lives in `adapter/metrics.py`.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

ENV_DIR = "SPARSESERVE_STATS_DIR"

COUNTER_NAMES = (
    "decode_steps",          # sparse decode layer-steps (one per layer per step with decode requests)
    "decode_queries",        # decode query rows handled by sparse attention (request x layer)
    "pages_scored",          # (request, KV head, page) scores computed
    "pages_selected",        # (request, KV head, page) entries attended
    "tokens_attended",       # (request, KV head, token) entries attended by sparse decode
    "dense_tokens",          # query tokens attended densely (prefill and dense layers)
    "pages_summarized",      # page metadata entries written (pages that filled up)
    "hbm_hits",              # offload: selected pages found in the HBM page cache
    "hbm_misses",            # offload: pages loaded from host DRAM into the HBM cache (FlashH2D)
    "hbm_evictions",         # offload: pages evicted from the HBM cache
    "bytes_h2d",             # offload: bytes loaded host -> HBM (cache misses and prefill context)
    "bytes_d2h",             # offload: bytes saved HBM -> host (FlashD2H)
    "parked_steps",          # offload: (request, step) pairs a running decode request was parked (working set)
    "segment_token_layers",  # layer-segmented prefill: prompt tokens x layers run
    "segment_steps",         # layer-segmented prefill: engine steps that ran prefill units
    "segment_steps_with_decodes",  # layer-segmented prefill: of those, steps whose forward also ran decode requests
    "segment_last_token_layers",  # layer-segmented prefill: a prompt's last token x layers attended from the prefill's kept output
)
GAUGE_NAMES = (
    "hbm_pages_in_use",      # offload: HBM cache slots holding a page
    "host_blocks_in_use",    # offload: logical (host DRAM) KV blocks allocated to requests
    "working_set_bytes",     # offload: estimated HBM working set of the decode requests scheduled this step
    "batch_cap",             # offload: decode requests the HBM working set let run this step
    "segment_peak_bytes",    # layer-segmented prefill: the most HBM one prompt's buffers held (hidden states + one layer's KV)
)
NAMES = COUNTER_NAMES + GAUGE_NAMES


class Counters:
    def __init__(self) -> None:
        self.values = dict.fromkeys(NAMES, 0)

    def add(self, name: str, amount: int) -> None:
        self.values[name] += int(amount)


_PROCESS_COUNTERS: Counters | None = None


_PUBLISH_LOCK = threading.Lock()


def process_counters() -> Counters:
    """This process's one `Counters` (what `publish` writes to this process's file)."""
    global _PROCESS_COUNTERS
    if _PROCESS_COUNTERS is None:
        _PROCESS_COUNTERS = Counters()
    return _PROCESS_COUNTERS


def ensure_stats_dir() -> Path:
    path = os.environ.get(ENV_DIR)
    if not path:
        path = tempfile.mkdtemp(prefix="sparseserve-stats-")
        os.environ[ENV_DIR] = path
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def publish(counters: Counters, directory: Path | None = None) -> Path:
    """Write this process's file atomically; safe from several threads of one process (the scheduler's connector
    and a worker's statistics thread share a process under vLLM's single-GPU executor): each writes its own
    temporary file, and a lock orders the replacements."""
    directory = directory or ensure_stats_dir()
    target = directory / f"{os.getpid()}.json"
    tmp = directory / f"{os.getpid()}.{threading.get_ident()}.tmp"
    with _PUBLISH_LOCK:
        tmp.write_text(json.dumps(counters.values))
        os.replace(tmp, target)
    return target


def read_totals(directory: Path | str | None = None) -> dict[str, int]:
    directory = Path(directory or os.environ.get(ENV_DIR, ""))
    totals = dict.fromkeys(NAMES, 0)
    if not directory.is_dir():
        return totals
    for f in directory.glob("*.json"):
        try:
            values = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # a file being replaced right now
        # Counters of finished processes still count; their gauges (current occupancy) no longer hold.
        names = NAMES if _alive(f.stem) else COUNTER_NAMES
        for k in names:
            totals[k] += int(values.get(k, 0))
    return totals


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def format_line(totals: dict[str, int]) -> str:
    sel = totals["pages_selected"]
    scored = totals["pages_scored"]
    frac = f"{sel / scored:.1%}" if scored else "n/a"
    return (
        f"SparseServe: sparse decode layer-steps={totals['decode_steps']} queries={totals['decode_queries']} "
        f"pages scored={scored} selected={sel} ({frac}) tokens attended={totals['tokens_attended']} "
        f"dense tokens={totals['dense_tokens']} pages summarized={totals['pages_summarized']}"
        + (
            f" | HBM cache hits={totals['hbm_hits']} misses={totals['hbm_misses']} pages in use={totals['hbm_pages_in_use']}"
            f" H2D={totals['bytes_h2d'] / 2**20:.1f} MiB D2H={totals['bytes_d2h'] / 2**20:.1f} MiB"
            f" host blocks in use={totals['host_blocks_in_use']}"
            f" | working set={totals['working_set_bytes'] / 2**20:.1f} MiB batch cap={totals['batch_cap']}"
            f" parked request-steps={totals['parked_steps']}"
            if totals["bytes_d2h"] else ""
        )
    )
